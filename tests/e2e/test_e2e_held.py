"""Held tasks on the worker side: held, never run before a signed release, released through
admission, bound to the exact call, grants bounded and verified, reviewers told by webhook, and
durable across restarts of Redis (AOF) and of the workers."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.embedded import EmbeddedRedis
from governance.integration import GovernanceHeaders, LimitExceeded
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus
from governance.store.keys import TenantKeys
from tests.e2e.conftest import WorkerProcess, audit_of, to_broker, types_of, wait_until
from tests.e2e.observer import ObserverServer
from workers.api import submit_tool

pytestmark = pytest.mark.timeout(180)

Keys = dict[str, Ed25519PrivateKey]


def ctx(tenant: str, user: str = "dana", agent: str = "ops-agent") -> ActionContext:
    return ActionContext(tenant=tenant, agent=agent, run="run-held", user=user)


def held_status(approvals: Reviewers, task_id: str) -> HeldStatus | None:
    task = approvals.store.find(task_id, approvals.runtime.policy.tenant_names)
    return task.status if task else None


def test_held_from_the_api_and_from_the_broker_never_run_before_release(
    app: Celery, runtime: GovernanceRuntime, workspace: Path, keys: Keys
) -> None:
    approvals = Reviewers(app, runtime)
    via_api = submit_tool(app, ctx("t-held"), "write_file", path="api.txt", content="a")
    assert via_api.state == "HELD"
    assert held_status(approvals, via_api.id) is HeldStatus.HELD

    via_broker = to_broker(
        app,
        "tools.write_file",
        {"path": "broker.txt", "content": "b"},
        GovernanceHeaders(context=ctx("t-held")).to_headers(),
    )
    wait_until(
        lambda: held_status(approvals, via_broker.id) is HeldStatus.HELD,
        timeout_s=30,
        what="the worker to move the message to the held store",
    )
    # Its result says so just after (written once the held store has it).
    wait_until(lambda: via_broker.state == "HELD", 10, "the result to say HELD")
    assert not (workspace / "api.txt").exists()
    assert not (workspace / "broker.txt").exists()
    assert types_of(audit_of(runtime, via_api.id)) == ["held"]

    outcome = approvals.approve(via_broker.id, keys["alice"], "looks fine")
    assert (outcome.outcome, outcome.reviewer) == ("released", "alice")
    assert via_broker.get(timeout=30) == {"path": "broker.txt", "bytes": 1}
    assert types_of(audit_of(runtime, via_broker.id)) == [
        "held",
        "released",
        "admitted",
        "task_finished",
    ]


def test_an_approval_tier_action_without_a_requester_is_denied(app: Celery) -> None:
    from governance.integration import ActionDenied

    anonymous = ActionContext(tenant="t-held", agent="ops-agent", run="run-held")
    with pytest.raises(ActionDenied, match="needs a requester"):
        submit_tool(app, anonymous, "write_file", path="anon.txt", content="x")


def test_a_task_marked_released_in_redis_never_runs_and_is_audited(
    app: Celery, runtime: GovernanceRuntime, workspace: Path, state_server: EmbeddedRedis
) -> None:
    """Whoever can write Redis marks a held task released and queues its message: the worker
    finds no valid signature in the message, and holds it again."""
    approvals = Reviewers(app, runtime)
    held = submit_tool(app, ctx("t-held"), "write_file", path="forged.txt", content="x")
    task = approvals.find(held.id)
    keys_ = TenantKeys("t-held")
    client = redis.Redis.from_url(state_server.url)
    try:
        client.hset(keys_.held(held.id), mapping={"status": "released", "approvals": 1})
        client.zrem(keys_.held_by_status("held"), held.id)
        client.hset(
            keys_.task(held.id),
            mapping={"where": "queued", "msg": json.dumps(task.envelope), "since": 0},
        )
        client.zadd(keys_.ledger, {keys_.task(held.id): 0})  # due: the reconciler sends it
    finally:
        client.close()
    wait_until(
        lambda: types_of(audit_of(runtime, held.id)).count("held") >= 2,
        timeout_s=30,
        what="the message the reconciler published to be held again",
    )
    assert held_status(approvals, held.id) is HeldStatus.HELD
    assert not (workspace / "forged.txt").exists()
    assert "admitted" not in types_of(audit_of(runtime, held.id))


def test_copied_or_replayed_approvals_release_nothing_else(
    app: Celery, runtime: GovernanceRuntime, workspace: Path, keys: Keys
) -> None:
    approvals = Reviewers(app, runtime)
    first = submit_tool(app, ctx("t-held"), "write_file", path="once.txt", content="1")
    approvals.approve(first.id, keys["alice"])
    assert first.get(timeout=30) == {"path": "once.txt", "bytes": 1}
    signed = approvals.find(first.id).signed_approvals()
    (workspace / "once.txt").unlink()

    # Its genuine signed approval, copied onto another call (other arguments, same context) and
    # onto the same call with an edited context: each is held again, audited as forged.
    headers = {
        **GovernanceHeaders(context=ctx("t-held")).to_headers(),
        "gov_approvals": json.dumps(signed),
    }
    other_args = to_broker(
        app, "tools.write_file", {"path": "once.txt", "content": "evil"}, headers
    )
    edited = {
        **GovernanceHeaders(context=ctx("t-held", user="mallory")).to_headers(),
        "gov_approvals": json.dumps(signed),
    }
    other_ctx = to_broker(
        app, "tools.write_file", {"path": "once.txt", "content": "1"}, edited, task_id=first.id
    )
    for copy in (other_args, other_ctx):
        wait_until(
            lambda c=copy: "forged_release" in types_of(audit_of(runtime, c.id)),
            timeout_s=30,
            what="the copied release to be refused",
        )
    assert held_status(approvals, other_args.id) is HeldStatus.HELD
    time.sleep(0.5)
    assert not (workspace / "once.txt").exists()
    assert types_of(audit_of(runtime, first.id)).count("admitted") == 1


def test_a_released_task_goes_through_admission(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    approvals = Reviewers(app, runtime)
    first = submit_tool(app, ctx("t-held-budget"), "echo", text="one")
    second = submit_tool(app, ctx("t-held-budget"), "echo", text="two")
    approvals.approve(first.id, keys["alice"])
    assert first.get(timeout=30) == {"text": "one"}
    approvals.approve(second.id, keys["alice"])
    with pytest.raises(LimitExceeded, match="step_limit exceeded: 2 / 1"):
        second.get(timeout=30)
    assert "admitted" not in types_of(audit_of(runtime, second.id))


def test_a_grant_needs_the_quorum_is_bounded_and_can_be_revoked(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    approvals = Reviewers(app, runtime)
    first = submit_tool(app, ctx("t-grant"), "echo", text="first")
    asked = approvals.approve(first.id, keys["alice"], "routine", grant_for=timedelta(hours=1))
    assert asked.outcome == "recorded"
    assert approvals.grants("t-grant") == []  # the first of two approvals creates no grant
    done = approvals.approve(first.id, keys["bob"], "ok", grant_for=timedelta(hours=48))
    assert done.outcome == "released"
    assert done.grant_id is not None
    assert first.get(timeout=30) == {"text": "first"}
    (grant,) = approvals.grants("t-grant")
    assert grant["active"]
    # The shortest request (1 h), capped by approval.max_grant (30 min).
    assert grant["until_ms"] - time.time() * 1000 <= 30 * 60 * 1000 + 1000

    # The same agent, the same action: runs at once, from the API and straight from the broker.
    again = submit_tool(app, ctx("t-grant"), "echo", text="again")
    assert again.get(timeout=30) == {"text": "again"}
    direct = to_broker(
        app,
        "tools.echo",
        {"text": "direct"},
        GovernanceHeaders(context=ctx("t-grant")).to_headers(),
    )
    assert direct.get(timeout=30) == {"text": "direct"}
    other = submit_tool(app, ctx("t-grant", agent="other-agent"), "echo", text="other")
    assert other.state == "HELD"

    approvals.revoke("t-grant", done.grant_id, "test")
    assert approvals.grants("t-grant") == []
    assert submit_tool(app, ctx("t-grant"), "echo", text="revoked").state == "HELD"
    assert "grant_revoked" in {e.fields["type"] for e in runtime.audit_log.records("t-grant")}


def test_a_grant_written_into_redis_by_hand_grants_nothing(
    app: Celery, runtime: GovernanceRuntime, state_server: EmbeddedRedis
) -> None:
    fake = {"id": "g1", "agent": "ops-agent", "action": "echo", "until_ms": 2**42, "decisions": []}
    client = redis.Redis.from_url(state_server.url)
    try:
        client.hset(TenantKeys("t-grant").grants, "g1", json.dumps(fake))
    finally:
        client.close()
    assert submit_tool(app, ctx("t-grant"), "echo", text="sneaky").state == "HELD"
    (listed,) = Reviewers(app, runtime).grants("t-grant")
    assert not listed["active"]


def test_a_held_task_calls_the_webhook_once_with_the_documented_body(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    held = submit_tool(app, ctx("t-notify"), "echo", text="tell someone")
    mine = wait_until(
        lambda: [h for h in observer.observations.hooks if h.get("task_id") == held.id],
        timeout_s=30,
        what="the webhook to be called",
    )
    time.sleep(1.5)  # a second call would come here: it must not
    (body,) = [h for h in observer.observations.hooks if h.get("task_id") == held.id]
    assert body == mine[0]
    assert body["event"] == "held"
    assert (body["tenant"], body["agent"], body["requested_by"]) == (
        "t-notify",
        "ops-agent",
        "dana",
    )
    assert body["call"]["input"] == {"text": "tell someone"}
    assert body["reviewers"] == ["alice"]
    assert body["commands"]["approve"] == f"govctl held approve {held.id} --key PATH --reason '...'"


def test_a_webhook_that_is_down_delays_nothing_and_is_retried(
    app: Celery, runtime: GovernanceRuntime, keys: Keys
) -> None:
    approvals = Reviewers(app, runtime)
    held = submit_tool(app, ctx("t-notify-down"), "echo", text="nobody listens")
    assert held.state == "HELD"
    # Deciding and running are not delayed by the dead webhook.
    approvals.approve(held.id, keys["alice"])
    assert held.get(timeout=30) == {"text": "nobody listens"}
    failures = wait_until(
        lambda: [
            e
            for e in runtime.audit_log.records("t-notify-down")
            if e.fields["type"] == "notify_failed" and e.fields.get("task_id") == held.id
        ][1:],
        timeout_s=30,
        what="two failed attempts to be audited",
    )
    assert "127.0.0.1:9" in failures[0].fields["reason"]


@pytest.mark.timeout(300)
def test_a_thousand_held_tasks_survive_restarts_of_redis_and_workers(
    app: Celery,
    runtime: GovernanceRuntime,
    state_server: EmbeddedRedis,
    worker: WorkerProcess,
    keys: Keys,
) -> None:
    approvals = Reviewers(app, runtime)
    results = [submit_tool(app, ctx("t-durable"), "echo", text=f"n{i}") for i in range(1000)]
    assert approvals.store.count("t-durable", HeldStatus.HELD) == 1000

    worker.stop()
    state_server.restart()
    worker.start(app)

    assert approvals.store.count("t-durable", HeldStatus.HELD) == 1000
    listed, cursor = [], None
    while True:
        page = approvals.store.page("t-durable", HeldStatus.HELD, limit=200, cursor=cursor)
        listed += [t.task_id for t in page.tasks]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(listed) == sorted(r.id for r in results)
    for result in results:
        assert approvals.approve(result.id, keys["alice"]).outcome == "released"
    for i, result in enumerate(results):
        assert result.get(timeout=120) == {"text": f"n{i}"}
    assert approvals.store.count("t-durable", HeldStatus.RELEASED) == 1000
