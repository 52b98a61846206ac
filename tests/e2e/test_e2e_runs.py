"""Agent runs as the source runtimes define them, end to end with real workers: a run's wall
time, a cost alert that asks the reviewers, step timeouts, and runs in flight per tenant."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.integration import ActionFailed, LimitExceeded
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.errors import ApprovalRejected
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store import Period, read_usage
from tests.e2e.conftest import audit_of, types_of, wait_until
from tests.e2e.observer import ObserverServer
from tests.e2e.test_e2e_govctl import govctl
from workers.api import submit_llm, submit_tool

pytestmark = pytest.mark.timeout(180)

Keys = dict[str, Ed25519PrivateKey]


def ctx(tenant: str, run: str, user: str | None = None) -> ActionContext:
    return ActionContext(tenant=tenant, agent="agent-1", run=run, user=user)


def wait_for_state(result: Any, state: str, timeout_s: float = 30) -> None:
    wait_until(lambda: result.state == state, timeout_s=timeout_s, what=f"{result.id} {state}")


def test_a_run_past_its_wall_time_is_refused_and_warned_from_80_percent(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    """``t-wall``: 2 s of wall time (grace 1 s). A step at 1.7 s runs and audits a warning; a
    step after 3 s is refused with ``wall_time_limit``."""
    run = ctx("t-wall", "run-wall")
    first = submit_tool(app, run, "echo", text="first")
    assert first.get(timeout=30) == {"text": "first"}
    started_ms = read_usage(runtime.state, "t-wall", Period.RUN, run="run-wall").started_at_ms
    assert started_ms is not None

    def since_start_ms() -> float:
        return time.time() * 1000 - started_ms

    wait_until(lambda: since_start_ms() >= 1700, timeout_s=10, what="80% of the wall time")
    warned = submit_tool(app, run, "echo", text="warned")
    assert warned.get(timeout=30) == {"text": "warned"}
    warnings = [e for e in audit_of(runtime, warned.id) if e.fields["type"] == "limit_warning"]
    assert len(warnings) == 1
    assert json.loads(warnings[0].fields["detail"])["violation"] == "wall_time_limit"

    wait_until(lambda: since_start_ms() >= 3100, timeout_s=10, what="wall time and grace")
    late = submit_tool(app, run, "echo", text="late")
    with pytest.raises(LimitExceeded, match=r"wall_time_limit exceeded: \d+ / 2000"):
        late.get(timeout=30)


def _pricey(app: Celery, run: ActionContext, text: str) -> Any:
    """A call that costs about $0.02 (20 input tokens reported at $0.001 each, and a few more)."""
    return submit_llm(
        app,
        run,
        provider="fake",
        model="fake-pricey",
        messages=[{"role": "user", "content": f"[[input 20]] {text}"}],
        max_tokens=3,
    )


def test_a_run_crossing_its_cost_alert_is_held_until_a_reviewer_approves(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    """``t-alert``: alert at $0.01. The first call costs ~$0.02; the run's next call is HELD
    with reason "cost alert"; approved, it runs (the run goes on to the next step, $0.03)."""
    run = ctx("t-alert", "run-alert-approve", user="dana")
    assert _pricey(app, run, "first").get(timeout=30)["text"].startswith("echo:")
    second = _pricey(app, run, "second")
    wait_for_state(second, "HELD")
    approvals = Reviewers(app, runtime)
    held = approvals.find(second.id)
    assert held.kind == "cost_alert"
    assert held.reason.startswith("cost alert: run 'run-alert-approve' has cost $0.02")
    outcome = approvals.approve(second.id, keys["alice"], "budget ok for this run")
    assert outcome.outcome == "released"
    assert second.get(timeout=30)["text"].startswith("echo:")
    usage = read_usage(runtime.state, "t-alert", Period.RUN, run="run-alert-approve")
    assert usage.alert_at_micro == 30_000  # the next multiple of $0.01 above $0.02
    assert types_of(audit_of(runtime, second.id))[:2] == ["held", "released"]


def test_a_reviewer_sets_the_runs_next_cost_alert_with_govctl(
    app: Celery, runtime: GovernanceRuntime, e2e_env: dict[str, str], reviewer_keys: dict[str, Any]
) -> None:
    """``govctl held approve --alert-to 0.10``: signed with the approval, verified by the
    worker, the run's next alert is $0.10: its next calls run without asking."""
    run = ctx("t-alert", "run-alert-to", user="dana")
    assert _pricey(app, run, "first").get(timeout=30)["text"].startswith("echo:")
    second = _pricey(app, run, "second")
    wait_for_state(second, "HELD")
    approved = govctl(
        e2e_env, "held", "approve", second.id, "--key", str(reviewer_keys["bob"]),
        "--alert-to", "0.10",
    )  # fmt: skip
    assert approved.returncode == 0, approved.stderr
    assert second.get(timeout=30)["text"].startswith("echo:")
    usage = read_usage(runtime.state, "t-alert", Period.RUN, run="run-alert-to")
    assert usage.alert_at_micro == 100_000
    assert _pricey(app, run, "third").get(timeout=30)["text"].startswith("echo:")  # ~$0.06


def test_a_rejection_at_the_cost_alert_ends_the_runs_pending_and_later_calls(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    run = ctx("t-alert", "run-alert-reject", user="dana")
    assert _pricey(app, run, "first").get(timeout=30)["text"].startswith("echo:")
    pending = [_pricey(app, run, f"pending {i}") for i in range(2)]
    for call in pending:
        wait_for_state(call, "HELD")
    Reviewers(app, runtime).reject(pending[0].id, keys["bob"], "this run costs too much")
    for call in pending:  # the run's decision: both end rejected
        with pytest.raises(ApprovalRejected, match="this run costs too much"):
            call.get(timeout=30)
    later = _pricey(app, run, "later")
    with pytest.raises(LimitExceeded, match="reviewers rejected this run at its cost alert"):
        later.get(timeout=30)
    other_run = ctx("t-alert", "run-alert-other", user="dana")
    assert _pricey(app, other_run, "unaffected").get(timeout=30)["text"].startswith("echo:")


def test_an_approval_tier_call_past_the_cost_alert_needs_both_approvals_and_runs_once(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    """Where the two holds meet: ``echo`` is approval-tier in ``t-alert``. After a costly call,
    the run's echo is held for its tier, approved, then held again at the cost alert (the tier's
    approval kept with it), approved again: it runs once, with both approvals."""
    run = ctx("t-alert", "run-alert-tier", user="dana")
    assert _pricey(app, run, "first").get(timeout=30)["text"].startswith("echo:")
    echo = submit_tool(app, run, "echo", text="twice approved")
    assert echo.state == "HELD"  # held at publish, for its tier
    approvals = Reviewers(app, runtime)
    assert approvals.find(echo.id).kind == "hold"
    approvals.approve(echo.id, keys["alice"], "tier ok")
    wait_until(
        lambda: approvals.find(echo.id).kind == "cost_alert",
        timeout_s=30,
        what="the released call to be held at the cost alert",
    )
    approvals.approve(echo.id, keys["bob"], "cost ok")
    assert echo.get(timeout=30) == {"text": "twice approved"}
    assert types_of(audit_of(runtime, echo.id)).count("task_finished") == 1


def test_a_step_over_its_timeout_ends_with_the_reason_and_frees_its_slot(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    """``t-steptime``: step timeout 1 s (permanent), concurrency 1. A call whose server holds
    it 5 s ends with ``step_timeout``; its slot is free: the tenant's next call runs."""
    slow = f"{observer.base_url}/slow?key=step-timeout&ms=5000"
    timed_out = submit_tool(app, ctx("t-steptime", "run-step"), "http_get", url=slow)
    nxt = submit_tool(app, ctx("t-steptime", "run-step"), "echo", text="next")
    with pytest.raises(
        ActionFailed, match=r"step_timeout: the step ran 1\.\d s, over its step timeout of 1 s"
    ):
        timed_out.get(timeout=30)
    assert nxt.get(timeout=30) == {"text": "next"}
    assert observer.observations.counts["step-timeout"] == 1  # it ran, once
    (failed,) = [e for e in audit_of(runtime, timed_out.id) if e.fields["type"] == "task_failed"]
    detail = json.loads(failed.fields["detail"])
    assert detail["spend"] == "assumed"
    assert detail["kind"] == "permanent"
    assert read_usage(runtime.state, "t-steptime", Period.DAY).active_leases == 0


@pytest.mark.both_brokers
def test_a_third_run_waits_until_one_of_two_runs_is_closed_then_runs_in_order(
    app: Celery, runtime: GovernanceRuntime, e2e_env: dict[str, str]
) -> None:
    """``t-runs``: 2 runs in flight. Runs 1 and 2 take a step each; the three steps of run 3
    wait (DEFERRED); ``govctl run close`` of run 1 hands them on, in the order they came."""
    for run in ("runs-1", "runs-2"):
        assert submit_tool(app, ctx("t-runs", run), "echo", text=run).get(timeout=30)
    third = [submit_tool(app, ctx("t-runs", "runs-3"), "echo", text=f"s{i}") for i in range(3)]
    for call in third:
        wait_for_state(call, "DEFERRED")
    assert submit_tool(app, ctx("t-runs", "runs-2"), "echo", text="on").get(timeout=30)

    closed = govctl(e2e_env, "run", "close", "runs-1", "-t", "t-runs", "--json")
    assert closed.returncode == 0, closed.stderr
    report = json.loads(closed.stdout)
    assert report["was_in_flight"] is True

    # Handed on in the order they began to wait (their "waiting" entries; two worker
    # processes may receive them in another order than they were published), each then runs on
    # whichever worker process takes it.
    def began_waiting(task_id: str) -> int:
        return next(
            int(e.fields["seq"])
            for e in audit_of(runtime, task_id)
            if e.fields["type"] == "waiting"
        )

    assert report["published"] == sorted((c.id for c in third), key=began_waiting)
    assert [c.get(timeout=30) for c in third] == [{"text": f"s{i}"} for i in range(3)]
    fourth = submit_tool(app, ctx("t-runs", "runs-4"), "echo", text="4")
    wait_for_state(fourth, "DEFERRED")  # runs 2 and 3 are in flight now
    assert govctl(e2e_env, "run", "close", "runs-3", "-t", "t-runs").returncode == 0
    assert fourth.get(timeout=30) == {"text": "4"}
    for run in ("runs-2", "runs-4"):  # the tenant's next test starts with no run in flight
        assert govctl(e2e_env, "run", "close", run, "-t", "t-runs").returncode == 0


def test_an_approved_step_of_a_run_without_a_slot_waits_and_is_never_held_again(
    app: Celery, runtime: GovernanceRuntime, keys: Keys, e2e_env: dict[str, str]
) -> None:
    """Approval meets runs in flight: runs A and B are in flight (limit 2); run C's
    approval-tier write is approved, waits for a run slot, and runs once when A is closed."""
    for run in ("appr-a", "appr-b"):
        assert submit_tool(app, ctx("t-runs", run), "echo", text=run).get(timeout=30)
    held = submit_tool(
        app, ctx("t-runs", "appr-c", user="dana"), "write_file", path="appr-c.txt", content="c"
    )
    assert held.state == "HELD"
    Reviewers(app, runtime).approve(held.id, keys["alice"], "ok")
    wait_for_state(held, "DEFERRED")
    assert govctl(e2e_env, "run", "close", "appr-a", "-t", "t-runs").returncode == 0
    assert held.get(timeout=30) == {"path": "appr-c.txt", "bytes": 1}
    kinds = types_of(audit_of(runtime, held.id))
    assert kinds.count("held") == 1
    assert kinds.count("task_finished") == 1
    for run in ("appr-b", "appr-c"):
        assert govctl(e2e_env, "run", "close", run, "-t", "t-runs").returncode == 0


def test_a_run_idle_for_its_idle_timeout_leaves_its_slot_to_the_next_run(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    """``t-runs-idle``: one run in flight, idle timeout 2 s. The second run's step waits until
    the first run has been idle 2 s, then runs (handed on by the reconciler)."""
    assert submit_tool(app, ctx("t-runs-idle", "idle-1"), "echo", text="a").get(timeout=30)
    waiting = submit_tool(app, ctx("t-runs-idle", "idle-2"), "echo", text="b")
    wait_for_state(waiting, "DEFERRED")
    assert waiting.get(timeout=60) == {"text": "b"}
    (entry,) = [e for e in audit_of(runtime, waiting.id) if e.fields["type"] == "waiting"]
    assert entry.fields["reason"] == "run_concurrency_limit"
