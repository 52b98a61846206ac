"""Held tasks on the worker side: held, never run before release, released through admission,
bound to the exact call, and durable across restarts of Redis (AOF) and of the workers."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery

from governance.embedded import EmbeddedRedis
from governance.integration import GovernanceHeaders, LimitExceeded
from governance.integration.approvals import Approvals
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus
from tests.e2e.conftest import WorkerProcess, audit_of, to_broker, types_of, wait_until
from workers.api import submit_tool

pytestmark = pytest.mark.timeout(180)


def ctx(tenant: str, user: str = "dana") -> ActionContext:
    return ActionContext(tenant=tenant, agent="ops-agent", run="run-held", user=user)


def held_status(approvals: Approvals, task_id: str) -> HeldStatus | None:
    task = approvals.store.find(task_id, ["t-held", "t-durable", "t-held-budget"])
    return task.status if task else None


def test_held_from_the_api_and_from_plain_apply_async_never_run_before_release(
    app: Celery, runtime: GovernanceRuntime, workspace: Path
) -> None:
    approvals = Approvals(app, runtime)
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
    assert via_broker.state == "HELD"
    assert not (workspace / "api.txt").exists()
    assert not (workspace / "broker.txt").exists()
    assert "admitted" not in types_of(audit_of(runtime, via_broker.id))
    assert types_of(audit_of(runtime, via_api.id)) == ["held"]

    outcome = approvals.approve(via_broker.id, "alice", "looks fine")
    assert outcome.outcome == "released"
    assert via_broker.get(timeout=30) == {"path": "broker.txt", "bytes": 1}
    assert types_of(audit_of(runtime, via_broker.id)) == [
        "held",
        "released",
        "admitted",
        "task_finished",
    ]


def test_copied_or_forged_release_headers_are_held_again(
    app: Celery, runtime: GovernanceRuntime, workspace: Path
) -> None:
    approvals = Approvals(app, runtime)
    held = submit_tool(app, ctx("t-held"), "write_file", path="once.txt", content="1")
    task = approvals.find(held.id)
    approvals.approve(held.id, "alice")
    assert held.get(timeout=30) == {"path": "once.txt", "bytes": 1}
    (workspace / "once.txt").unlink()

    # The released message, copied by hand with its (spent) release token: held again.
    spent = approvals.store.get("t-held", held.id)
    assert spent is not None
    copied_headers = {**task.headers, "gov_release": "0" * 32 + "." + "f" * 64}
    forged = to_broker(app, "tools.write_file", task.kwargs, copied_headers, task_id=held.id)
    wait_until(
        lambda: held_status(approvals, held.id) is HeldStatus.HELD,
        timeout_s=30,
        what="the forged message to be held again",
    )
    # (The result backend keeps the first run's SUCCESS: Celery never overwrites a success.)
    assert forged.id == held.id
    assert not (workspace / "once.txt").exists()

    # A genuine token for other arguments does not release this call either.
    other = approvals.release_token(held.id, "not-the-hash-of-this-call")
    to_broker(
        app,
        "tools.write_file",
        {"path": "once.txt", "content": "evil"},
        {**task.headers, "gov_release": other},
        task_id=held.id,
    )
    wait_until(
        lambda: types_of(audit_of(runtime, held.id)).count("held") >= 2,
        timeout_s=30,
        what="the mismatched token to be refused",
    )
    assert not (workspace / "once.txt").exists()
    assert types_of(audit_of(runtime, held.id)).count("admitted") == 1


def test_a_released_task_goes_through_admission(app: Celery, runtime: GovernanceRuntime) -> None:
    approvals = Approvals(app, runtime)
    first = submit_tool(app, ctx("t-held-budget"), "echo", text="one")
    second = submit_tool(app, ctx("t-held-budget"), "echo", text="two")
    approvals.approve(first.id, "alice")
    assert first.get(timeout=30) == {"text": "one"}
    approvals.approve(second.id, "alice")
    with pytest.raises(LimitExceeded, match="step_limit exceeded: 2 / 1"):
        second.get(timeout=30)
    assert "admitted" not in types_of(audit_of(runtime, second.id))


@pytest.mark.timeout(300)
def test_a_thousand_held_tasks_survive_restarts_of_redis_and_workers(
    app: Celery, runtime: GovernanceRuntime, state_server: EmbeddedRedis, worker: WorkerProcess
) -> None:
    approvals = Approvals(app, runtime)
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
        assert approvals.approve(result.id, "alice").outcome == "released"
    for i, result in enumerate(results):
        assert result.get(timeout=120) == {"text": f"n{i}"}
    assert approvals.store.count("t-durable", HeldStatus.RELEASED) == 1000


def test_an_approval_with_a_grant_lets_the_same_agent_act_without_approval(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    approvals = Approvals(app, runtime)
    first = submit_tool(app, ctx("t-held"), "shell", command=["echo", "first"])
    outcome = approvals.approve(first.id, "alice", "routine", grant_for=timedelta(hours=1))
    assert outcome.grant is not None
    assert outcome.grant.agent == "ops-agent"
    assert first.get(timeout=30)["stdout"].strip() == "first"

    # The same agent, the same action: runs at once, from the API and straight from the broker.
    again = submit_tool(app, ctx("t-held"), "shell", command=["echo", "again"])
    assert again.get(timeout=30)["stdout"].strip() == "again"
    direct = app.tasks["tools.shell"].apply_async(
        kwargs={"command": ["echo", "direct"]},
        headers=GovernanceHeaders(context=ctx("t-held")).to_headers(),
    )
    assert direct.get(timeout=30)["stdout"].strip() == "direct"
    # Another agent is still held.
    other = submit_tool(
        app,
        ActionContext(tenant="t-held", agent="other-agent", run="run-held", user="dana"),
        "shell",
        command=["echo", "other"],
    )
    assert other.state == "HELD"
