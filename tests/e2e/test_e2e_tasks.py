"""Governed tasks end to end: real Redis, real `celery worker` processes (prefork)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import redis
from celery import Celery

from governance.embedded import EmbeddedRedis
from governance.integration import ActionDenied, ActionFailed, GovernanceHeaders, LimitExceeded
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store import Period, read_usage
from tests.e2e.conftest import (
    WorkerProcess,
    audit_of,
    to_broker,
    types_of,
    verify_audit,
    wait_until,
)
from tests.e2e.observer import ObserverServer
from workers.api import submit_llm, submit_tool

pytestmark = pytest.mark.timeout(120)


def ctx(tenant: str, agent: str = "agent-1", run: str = "run-1") -> ActionContext:
    return ActionContext(tenant=tenant, agent=agent, run=run)


def headers(context: ActionContext) -> dict[str, object]:
    return GovernanceHeaders(context=context).to_headers()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_allowed_tool_runs_and_is_audited(app: Celery, runtime: GovernanceRuntime) -> None:
    result = submit_tool(app, ctx("t-basic"), "echo", text="hello")
    assert result.get(timeout=30) == {"text": "hello"}
    # The settlement is written before the result and read after it, on another server: the
    # result can be seen first.
    wait_until(
        lambda: "task_finished" in types_of(audit_of(runtime, result.id)), 10, "task_finished"
    )
    assert types_of(audit_of(runtime, result.id)) == ["admitted", "task_finished"]
    assert verify_audit(runtime) == []


def test_denied_tool_fails_with_reason_and_has_no_side_effect(
    app: Celery, runtime: GovernanceRuntime, workspace: Path
) -> None:
    intern = ctx("t-basic", agent="intern-7")
    with pytest.raises(ActionDenied, match="interns may not touch files"):
        submit_tool(app, intern, "write_file", path="intern.txt", content="x")
    # The same message sent straight to the broker is denied by the worker all the same.
    result = to_broker(
        app, "tools.write_file", {"path": "intern.txt", "content": "x"}, headers(intern)
    )
    with pytest.raises(ActionDenied, match="interns may not touch files"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert not (workspace / "intern.txt").exists()
    assert types_of(audit_of(runtime, result.id)) == ["authorization_denied"]


@pytest.mark.parametrize(
    ("sent_headers", "reason"),
    [
        ({}, "no governance context"),
        (
            {"gov_context": json.dumps({"tenant": "t-basic", "agent": "a b", "run": "r"})},
            "malformed governance context: agent",
        ),
        ({"gov_context": "{not json"}, "malformed governance context"),
    ],
)
def test_message_without_valid_context_is_denied_and_runs_nothing(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    sent_headers: dict[str, str],
    reason: str,
) -> None:
    target = f"no-context-{len(sent_headers)}-{len(reason)}.txt"
    result = to_broker(app, "tools.write_file", {"path": target, "content": "x"}, sent_headers)
    with pytest.raises(ActionDenied, match=reason):
        result.get(timeout=30)
    assert not (workspace / target).exists()
    entries = audit_of(runtime, result.id)
    assert types_of(entries) == ["authorization_denied"]
    assert reason.split(":")[0] in entries[0].fields["reason"]


def test_shadow_and_suggest_never_run_and_say_so(
    app: Celery, runtime: GovernanceRuntime, workspace: Path
) -> None:
    shadowed = submit_tool(
        app, ctx("t-basic", agent="watcher"), "write_file", path="s.txt", content="x"
    )
    suggested = submit_tool(
        app, ctx("t-basic", agent="proposer"), "write_file", path="g.txt", content="x"
    )
    assert shadowed.get(timeout=30)["governance"] == "shadowed"
    assert suggested.get(timeout=30)["governance"] == "suggested"
    assert shadowed.get()["would_run"]["input"] == {"path": "s.txt", "content": "x"}
    assert not (workspace / "s.txt").exists()
    assert not (workspace / "g.txt").exists()
    assert types_of(audit_of(runtime, shadowed.id)) == ["shadowed"]
    assert types_of(audit_of(runtime, suggested.id)) == ["suggested"]


@pytest.mark.both_brokers
def test_tenant_concurrency_one_without_head_of_line_blocking(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    slow = f"{observer.base_url}/slow?key=conc&ms=300"
    other = f"{observer.base_url}/slow?key=other&ms=300"
    limited = [submit_tool(app, ctx("t-conc"), "http_get", url=slow) for _ in range(6)]
    others = [submit_tool(app, ctx("t-other"), "http_get", url=other) for _ in range(3)]
    for result in limited + others:
        assert result.get(timeout=60)["status"] == 200
    seen = observer.observations
    assert seen.max_in_flight["conc"] == 1  # observed by the server, not by the governance layer
    assert len(seen.requests["conc"]) == 6
    # The other tenant was not stuck behind the limited one: it finished before they all did.
    assert max(end for _, end in seen.requests["other"]) < max(e for _, e in seen.requests["conc"])
    assert any("waiting" in types_of(audit_of(runtime, r.id)) for r in limited), (
        "with concurrency 1 and 6 tasks on 4 processes, some must have been deferred"
    )


@pytest.mark.both_brokers
def test_transient_failures_retry_with_the_policy_delays(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    url = f"{observer.base_url}/flaky?key=flaky-retry&fail=2"
    result = submit_tool(app, ctx("t-retry"), "http_get", url=url)
    assert result.get(timeout=60)["status"] == 200
    entries = audit_of(runtime, result.id)
    assert types_of(entries).count("admitted") == 3
    delays = [
        json.loads(e.fields["detail"])["delay_ms"]
        for e in entries
        if e.fields["type"] == "retry_scheduled"
    ]
    assert delays == [200, 400]  # base 200 ms, doubled, no jitter in the test policy
    starts = [start for start, _ in observer.observations.requests["flaky-retry"]]
    assert starts[1] - starts[0] >= 0.2
    assert starts[2] - starts[1] >= 0.4


@pytest.mark.both_brokers
def test_429_sets_a_shared_cooldown_for_the_provider(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    first = submit_llm(
        app,
        ctx("t-retry"),
        provider="fake",
        model="fake-small",
        messages=user("[[fail 429 1000 1]] hello"),
        max_tokens=20,
    )
    wait_until(
        lambda: "retry_scheduled" in types_of(audit_of(runtime, first.id)),
        timeout_s=30,
        what="the 429 to be recorded",
    )
    second = submit_llm(
        app,
        ctx("t-retry"),
        provider="fake",
        model="fake-small",
        messages=user("meanwhile"),
        max_tokens=20,
    )
    assert first.get(timeout=30)["text"].startswith("echo:")
    assert second.get(timeout=30)["text"] == "echo: meanwhile"

    def started(task_id: str) -> list[int]:
        return [
            int(e.fields["ts"])
            for e in audit_of(runtime, task_id)
            if e.fields["type"] == "admitted"
        ]

    first_starts = started(first.id)
    assert len(first_starts) == 2
    assert first_starts[1] - first_starts[0] >= 1000
    second_entries = audit_of(runtime, second.id)
    deferrals = [
        json.loads(e.fields["detail"])["violation"]
        for e in second_entries
        if e.fields["type"] == "waiting"
    ]
    assert deferrals
    assert set(deferrals) == {"cooldown"}
    assert started(second.id)[0] - first_starts[0] >= 1000


def test_permanent_error_fails_after_exactly_one_attempt(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    result = submit_llm(
        app,
        ctx("t-retry"),
        provider="fake",
        model="fake-small",
        messages=user("[[fail permanent]]"),
        max_tokens=20,
    )
    with pytest.raises(ActionFailed, match="permanent error after 1 attempt"):
        result.get(timeout=30)
    assert types_of(audit_of(runtime, result.id)) == ["admitted", "task_failed"]


def test_concurrent_llm_calls_never_exceed_the_token_budget(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    calls = [
        submit_llm(
            app,
            ctx("t-budget"),
            provider="fake",
            model="fake-small",
            messages=user(f"[[fill]] call {i}"),
            max_tokens=300,
        )
        for i in range(6)
    ]
    succeeded, over = 0, []
    for call in calls:
        try:
            call.get(timeout=60)
            succeeded += 1
        except LimitExceeded as exc:
            over.append(str(exc))
    usage = read_usage(runtime.state, "t-budget", Period.DAY)
    assert usage.total_tokens <= 1000
    assert succeeded == 3
    assert len(over) == 3
    assert all(reason.startswith("token_limit exceeded:") for reason in over)


@pytest.mark.redis_broker
def test_retry_after_longer_than_visibility_timeout_runs_once_after_the_wait(
    app: Celery, runtime: GovernanceRuntime, broker: EmbeddedRedis
) -> None:
    result = submit_llm(
        app,
        ctx("t-retry", run="run-long-wait"),
        provider="fake",
        model="fake-small",
        messages=user("[[fail 429 8000 1]] later"),
        max_tokens=20,
    )
    assert result.get(timeout=60)["text"] == "echo: later"
    entries = audit_of(runtime, result.id)
    starts = [int(e.fields["ts"]) for e in entries if e.fields["type"] == "admitted"]
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 8000
    assert types_of(entries).count("task_finished") == 1
    # Nothing is left that could deliver it again: not parked, not in a queue, not unacked.
    assert runtime.ledger.where("t-retry", result.id)["where"] == "done"
    assert runtime.ledger.status("t-retry", overdue_after_ms=0).open == 0
    client = redis.Redis.from_url(broker.url)
    try:
        leftovers = [
            raw
            for key in client.keys("*")
            if client.type(key) in (b"list", b"hash", b"zset")
            and key.startswith((b"celery", b"unacked"))
            for raw in _values(client, key)
            if result.id.encode() in raw
        ]
    finally:
        client.close()
    assert leftovers == []


def _values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    if kind == b"list":
        return list(client.lrange(key, 0, -1))
    if kind == b"hash":
        return list(client.hvals(key))
    return list(client.zrange(key, 0, -1))


@pytest.mark.both_brokers
def test_state_redis_down_defers_and_nothing_runs_until_it_is_back(
    app: Celery, runtime: GovernanceRuntime, state_server: EmbeddedRedis, workspace: Path
) -> None:
    state_server.halt()
    try:
        result = to_broker(
            app,
            "tools.write_file",
            {"path": "while-down.txt", "content": "x"},
            headers(ctx("t-basic")),
        )
        wait_until(
            lambda: result.state == "DEFERRED",
            timeout_s=30,
            what="the task to be deferred while the state Redis is down",
        )
        assert "unavailable" in result.info["reason"]
        assert not (workspace / "while-down.txt").exists()
    finally:
        state_server.restart()
    assert result.get(timeout=60) == {"path": "while-down.txt", "bytes": 1}
    assert (workspace / "while-down.txt").read_text() == "x"
    # Once the store was back, the admission recorded the deferrals the outage caused.
    (admitted,) = [e for e in audit_of(runtime, result.id) if e.fields["type"] == "admitted"]
    assert json.loads(admitted.fields["detail"])["outage_deferrals"] >= 1


def test_openai_compatible_provider_through_the_worker(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    # The provider's base URL is the observer's /v1; model names route to scripted behaviour.
    ok = submit_llm(
        app,
        ctx("t-local"),
        provider="local",
        model="local-model",
        messages=user("hi"),
        max_tokens=50,
    )
    answer = ok.get(timeout=30)
    assert answer["usage"] == {"input_tokens": 11, "output_tokens": 7}
    assert answer["cost_usd"] == pytest.approx((11 * 1.0 + 7 * 2.0) / 1_000_000)
    usage = read_usage(runtime.state, "t-local", Period.DAY)
    assert (usage.used.input_tokens, usage.used.output_tokens) == (11, 7)


def test_a_429_of_one_tenant_pauses_every_tenant_of_a_deployment_scoped_provider(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    """``shared`` has ``scope: deployment`` (one API key): tenant A's call gets a 429 with
    Retry-After 2 s; tenant B's call, published right after, waits for the same cooldown."""
    a = submit_llm(
        app,
        ctx("t-share-a"),
        provider="shared",
        model="retry-after-2s",
        messages=user("first"),
        max_tokens=20,
    )
    wait_until(
        lambda: observer.observations.counts["model:retry-after-2s"] >= 1,
        timeout_s=30,
        what="tenant A's call to get its 429",
    )
    (refused_at, _) = observer.observations.requests["model:retry-after-2s"][0]
    b = submit_llm(
        app, ctx("t-share-b"), provider="shared", model="plain", messages=user("b"), max_tokens=20
    )
    assert b.get(timeout=60)["text"].startswith("ok:")
    assert a.get(timeout=60)["text"].startswith("ok:")
    (b_sent_at, _) = observer.observations.requests["model:plain"][0]
    assert b_sent_at >= refused_at + 2.0, "tenant B called during tenant A's cooldown"
    waited = [e for e in audit_of(runtime, b.id) if e.fields["type"] == "waiting"]
    assert [e.fields["reason"] for e in waited] == ["cooldown"]


@pytest.mark.both_brokers
def test_sigkilled_worker_process_loses_nothing(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer, worker: WorkerProcess
) -> None:
    url = f"{observer.base_url}/slow?key=killed&ms=1500"
    victim = submit_tool(app, ctx("t-conc", run="run-kill"), "http_get", url=url)
    wait_until(
        lambda: observer.observations.in_flight["killed"] >= 1,
        timeout_s=30,
        what="the task to be running",
    )
    active = wait_until(
        lambda: [
            t
            for tasks in (app.control.inspect(timeout=1).active() or {}).values()
            for t in tasks
            if t["id"] == victim.id
        ],
        timeout_s=10,
        what="the worker to report the running task",
    )
    os.kill(active[0]["worker_pid"], signal.SIGKILL)
    follower = submit_tool(app, ctx("t-conc", run="run-kill"), "echo", text="after")
    # Redelivered and completed (acks_late + reject_on_worker_lost), never silently lost.
    assert victim.get(timeout=60)["status"] == 200
    assert follower.get(timeout=60) == {"text": "after"}
    assert read_usage(runtime.state, "t-conc", Period.DAY).active_leases == 0
    # The kill really interrupted a run: the body started twice, the server saw two requests.
    assert types_of(audit_of(runtime, victim.id)).count("admitted") == 2
    assert observer.observations.counts["killed"] == 2
    assert worker.process is not None
    assert worker.process.poll() is None
