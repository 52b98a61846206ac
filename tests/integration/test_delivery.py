"""The life of a delivery, in this process: Celery's own test worker (a thread, the solo pool)
serves a small governed app on the test run's real Redis (broker, results and state alike).

Each branch of ``worker.delivery`` that needs a worker but not a worker *process*: a message
without a context, a denial, shadow and suggest, a hold, a task that runs and is audited, a
permanent failure, a retry that succeeds, a task over its tenant's concurrency that waits and is
handed on, a copy of a task that already ran. What only real processes show (kills, prefork,
both brokers, Flower) stays in tests/e2e.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun

from governance.integration import (
    ActionDenied,
    ActionFailed,
    GovernanceHeaders,
    GovernanceRuntime,
    governance_context,
)
from governance.policy.context import ActionContext
from governance.policy.errors import ActionError
from governance.store.audit import AuditEntry
from governance.store.held import HeldStatus, HeldStore
from tests.integration.apps import governed_app
from tests.polling import wait_until

POLICY = """
version: 1
tools:
  inproc.echo: compute
  inproc.fail: compute
  inproc.flaky: compute
  inproc.gate: compute
  inproc.held: process.exec
defaults:
  retry: {max_retries: 2, backoff_base_ms: 10, backoff_cap_ms: 50, jitter_ratio: 0.0}
  long_running: disabled
tenants:
  acme:
    allowed_tools: [inproc.echo, inproc.fail, inproc.flaky, inproc.gate, inproc.held]
    deny:
      - {agent: "intern-*", action: "inproc.fail", reason: "interns may not fail things"}
    tiers:
      agents: {watcher: shadow, proposer: suggest}
      actions: {process.exec: act_with_approval}
  narrow:
    allowed_tools: [inproc.gate, inproc.echo]
    concurrency: 1
"""

#: Released by the test: ``inproc.gate`` runs until its key is set.
GATES: dict[str, threading.Event] = {}
#: How often each body ran, by its key.
RUNS: dict[str, int] = {}
#: How many deliveries of each task id the worker finished handling (``task_postrun``).
HANDLED: dict[str, int] = {}


def _handled(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        HANDLED[task_id] = HANDLED.get(task_id, 0) + 1


def ctx(tenant: str = "acme", agent: str = "agent-1", user: str | None = None) -> ActionContext:
    return ActionContext(tenant=tenant, agent=agent, run=f"run-{uuid.uuid4().hex[:8]}", user=user)


@pytest.fixture(scope="module")
def governed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    """A governed app with four tasks, served by an in-process worker."""
    queue = f"inproc-{uuid.uuid4().hex}"
    app = governed_app("inproc", POLICY, tmp_path_factory, broker_url=redis_url, lease_ms=2000)
    app.conf.update(task_track_started=True, task_default_queue=queue)

    @app.task(name="inproc.echo", shared=False)
    def echo(text: str) -> str:
        RUNS[text] = RUNS.get(text, 0) + 1
        return text

    @app.task(name="inproc.fail", shared=False)
    def fail(why: str) -> None:
        raise ActionError.permanent(why)

    @app.task(name="inproc.flaky", shared=False)
    def flaky(key: str, failures: int) -> int:
        RUNS[key] = RUNS.get(key, 0) + 1
        if RUNS[key] <= failures:
            raise ActionError.transient(f"attempt {RUNS[key]} failed")
        return RUNS[key]

    @app.task(name="inproc.gate", shared=False)
    def gate(key: str) -> str:
        GATES.setdefault(key, threading.Event()).wait(30)
        return key

    @app.task(name="inproc.held", shared=False)
    def held(command: str) -> str:
        RUNS[command] = RUNS.get(command, 0) + 1
        return command

    task_postrun.connect(_handled, weak=False)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        yield app
    task_postrun.disconnect(_handled)
    app.close()


@pytest.fixture
def runtime(governed: Celery, redis_url: str) -> GovernanceRuntime:
    from governance.integration import runtime_for

    return runtime_for(governed)


def audit_types(runtime: GovernanceRuntime, task_id: str) -> list[str]:
    entries: list[AuditEntry] = [
        e
        for chain in (*runtime.policy.tenant_names, "_deployment")
        for e in runtime.audit_log.records(chain)
        if e.fields.get("task_id") == task_id
    ]
    return [e.fields["type"] for e in entries]


def test_an_allowed_task_runs_and_its_admission_and_end_are_audited(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    with governance_context(ctx()):
        result = governed.tasks["inproc.echo"].delay("hello")
    assert result.get(timeout=20) == "hello"
    wait_until(lambda: "task_finished" in audit_types(runtime, result.id), 10, "task_finished")
    assert audit_types(runtime, result.id) == ["admitted", "task_finished"]


def test_a_message_without_a_context_is_denied_and_never_runs(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    text = f"no-context-{uuid.uuid4().hex[:6]}"
    task_id = str(uuid.uuid4())
    runtime.send_raw("inproc.echo", (text,), {}, task_id=task_id)
    result = governed.AsyncResult(task_id)
    with pytest.raises(ActionDenied, match="no governance context"):
        result.get(timeout=20)
    assert text not in RUNS
    wait_until(lambda: audit_types(runtime, task_id), 10, "the denial's audit entry")
    assert audit_types(runtime, task_id) == ["authorization_denied"]


def test_a_malformed_context_is_denied_with_the_field_that_is_wrong(governed: Celery) -> None:
    task_id = str(uuid.uuid4())
    runtime = governed.tasks["inproc.echo"].app
    headers = {"gov_context": '{"tenant": "acme", "agent": ""}'}
    from governance.integration import runtime_for

    runtime_for(runtime).send_raw("inproc.echo", ("x",), {}, task_id=task_id, headers=headers)
    with pytest.raises(ActionDenied, match="malformed governance context"):
        governed.AsyncResult(task_id).get(timeout=20)


def test_a_denied_agent_is_refused_at_publish_and_at_the_worker(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    intern = ctx(agent="intern-3")
    with (
        pytest.raises(ActionDenied, match="interns may not fail things"),
        governance_context(intern),
    ):
        governed.tasks["inproc.fail"].delay("x")
    # Straight to the broker, as anyone who can reach it may: the worker decides alone.
    task_id = str(uuid.uuid4())
    headers = GovernanceHeaders(context=intern).to_headers()
    runtime.send_raw("inproc.fail", ("x",), {}, task_id=task_id, headers=headers)
    with pytest.raises(ActionDenied, match="interns may not fail things"):
        governed.AsyncResult(task_id).get(timeout=20)


@pytest.mark.parametrize(("agent", "outcome"), [("watcher", "shadowed"), ("proposer", "suggested")])
def test_shadow_and_suggest_never_run_and_say_what_would_have_run(
    governed: Celery, runtime: GovernanceRuntime, agent: str, outcome: str
) -> None:
    text = f"{outcome}-{uuid.uuid4().hex[:6]}"
    with governance_context(ctx(agent=agent)):
        result = governed.tasks["inproc.echo"].delay(text)
    value: dict[str, Any] = result.get(timeout=20)
    assert value["governance"] == outcome
    assert value["would_run"]["input"] == {"text": text}
    assert text not in RUNS
    wait_until(lambda: outcome in audit_types(runtime, result.id), 10, f"the {outcome} entry")


def test_an_approval_tier_call_is_held_and_never_runs(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    command = f"held-{uuid.uuid4().hex[:6]}"
    with governance_context(ctx(user="dana")):
        result = governed.tasks["inproc.held"].delay(command)
    assert result.state == "HELD"
    held = HeldStore(runtime.state).find(result.id, runtime.policy.tenant_names)
    assert held is not None
    assert held.status is HeldStatus.HELD
    # A copy of it straight to the broker, without a release: it stays held, never runs.
    headers = GovernanceHeaders(context=ActionContext.model_validate(held.context)).to_headers()
    runtime.send_raw("inproc.held", (command,), {}, task_id=result.id, headers=headers)
    wait_until(lambda: HANDLED.get(result.id, 0) >= 1, 20, "the copy to be handled")
    assert command not in RUNS
    again = HeldStore(runtime.state).find(result.id, runtime.policy.tenant_names)
    assert again is not None
    assert again.status is HeldStatus.HELD
    assert result.state == "HELD"


def test_a_permanent_failure_fails_at_once_with_the_classified_reason(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    with governance_context(ctx()):
        result = governed.tasks["inproc.fail"].delay("the input is wrong")
    with pytest.raises(ActionFailed, match="permanent error after 1 attempt"):
        result.get(timeout=20)
    wait_until(lambda: "task_failed" in audit_types(runtime, result.id), 10, "task_failed")
    assert audit_types(runtime, result.id) == ["admitted", "task_failed"]


def test_a_transient_failure_is_retried_by_the_tenants_policy_until_it_succeeds(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    key = f"flaky-{uuid.uuid4().hex[:6]}"
    with governance_context(ctx()):
        result = governed.tasks["inproc.flaky"].delay(key, 2)
    assert result.get(timeout=30) == 3
    wait_until(lambda: "task_finished" in audit_types(runtime, result.id), 10, "task_finished")
    assert audit_types(runtime, result.id) == [
        "admitted",
        "retry_scheduled",
        "admitted",
        "retry_scheduled",
        "admitted",
        "task_finished",
    ]


def test_a_task_over_its_tenants_concurrency_waits_and_is_handed_on_in_order(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    first = f"gate-{uuid.uuid4().hex[:6]}"
    GATES[first] = threading.Event()
    with governance_context(ctx(tenant="narrow")):
        running = governed.tasks["inproc.gate"].delay(first)
        wait_until(lambda: running.state == "STARTED", 10, "the first task to start")
        waiting = governed.tasks["inproc.echo"].delay(f"after-{first}")
    wait_until(lambda: waiting.state == "DEFERRED", 10, "the second task to wait")
    assert waiting.info["violation"] == "concurrency_limit"
    GATES[first].set()
    assert running.get(timeout=20) == first
    assert waiting.get(timeout=20) == f"after-{first}"
    assert audit_types(runtime, waiting.id)[:2] == ["waiting", "admitted"]


def test_a_copy_of_a_task_that_already_ran_is_dropped_and_never_runs_again(
    governed: Celery, runtime: GovernanceRuntime
) -> None:
    text = f"copy-{uuid.uuid4().hex[:6]}"
    context = ctx()
    with governance_context(context):
        result = governed.tasks["inproc.echo"].delay(text)
    assert result.get(timeout=20) == text
    wait_until(lambda: "task_finished" in audit_types(runtime, result.id), 10, "task_finished")
    headers = GovernanceHeaders(context=context).to_headers()
    runtime.send_raw("inproc.echo", (text,), {}, task_id=result.id, headers=headers)
    wait_until(lambda: HANDLED.get(result.id, 0) >= 2, 20, "the copy to be handled")
    assert RUNS[text] == 1
    assert result.get(timeout=5) == text
    assert audit_types(runtime, result.id) == ["admitted", "task_finished"]
