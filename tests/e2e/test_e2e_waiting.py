"""Waiting, end to end: wait lists, hand-offs, booked turns and the wait limit, real workers."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.integration import LimitExceeded, governance_context
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus
from governance.store.keys import TenantKeys
from tests.e2e.conftest import WorkerProcess, audit_of, types_of, verify_audit, wait_until
from tests.e2e.observer import ObserverServer
from workers.api import submit_llm, submit_tool

pytestmark = [pytest.mark.timeout(180), pytest.mark.both_brokers]


def ctx(tenant: str, run: str = "run-1", user: str = "dana") -> ActionContext:
    return ActionContext(tenant=tenant, agent="agent-1", run=run, user=user)


def slow_call(app: Celery, tenant: str, ms: int, run: str = "run-1") -> object:
    return submit_llm(
        app,
        ctx(tenant, run=run),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": f"[[sleep {ms}]] work"}],
        max_tokens=5,
    )


def test_tasks_start_in_the_order_they_began_to_wait(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    calls = [slow_call(app, "t-line", 150) for _ in range(8)]
    for call in calls:
        call.get(timeout=60)  # type: ignore[attr-defined]
    waited, started = [], []
    for entry in sorted(
        (e for c in calls for e in audit_of(runtime, c.id)),  # type: ignore[attr-defined]
        key=lambda e: e.seq,
    ):
        if entry.fields["type"] == "waiting":
            waited.append(entry.fields["task_id"])
        elif entry.fields["type"] == "admitted" and entry.fields["task_id"] in waited:
            started.append(entry.fields["task_id"])
    assert len(waited) >= 5  # one slot, eight calls on four worker processes
    assert started == waited
    # Each waiting call cost one wait entry and one start: the audit does not follow re-checks.
    for call in calls:
        kinds = types_of(audit_of(runtime, call.id))  # type: ignore[attr-defined]
        assert kinds.count("waiting") <= 1
        assert kinds.count("admitted") == 1
    assert verify_audit(runtime) == []


def test_an_approved_task_meeting_a_busy_slot_waits_runs_once_and_is_never_held_again(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    approvals = Reviewers(app, runtime)
    busy = slow_call(app, "t-held-line", 2500)
    wait_until(
        lambda: runtime.ledger.status("t-held-line", overdue_after_ms=60_000).running == 1,
        timeout_s=30,
        what="the slow call to hold the tenant's only slot",
    )
    held = submit_tool(app, ctx("t-held-line"), "write_file", path="approved.txt", content="1")
    assert held.state == "HELD"
    assert approvals.approve(held.id, keys["alice"], "go").outcome == "released"
    assert held.get(timeout=60) == {"path": "approved.txt", "bytes": 1}
    busy.get(timeout=60)  # type: ignore[attr-defined]
    kinds = types_of(audit_of(runtime, held.id))
    assert kinds == ["held", "released", "waiting", "admitted", "task_finished"]
    task = approvals.find(held.id)
    assert task.status is HeldStatus.RELEASED
    assert task.reheld == 0


def test_a_granted_task_held_again_at_its_hand_off_gives_the_slot_back_and_waits_afresh(
    app: Celery,
    runtime: GovernanceRuntime,
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    approvals = Reviewers(app, runtime)
    first = submit_tool(app, ctx("t-grant-line"), "write_file", path="granted.txt", content="1")
    done = approvals.approve(first.id, keys["alice"], "routine", grant_for=timedelta(hours=1))
    assert done.outcome == "released"
    assert done.grant_id is not None
    assert first.get(timeout=60) == {"path": "granted.txt", "bytes": 1}
    busy = slow_call(app, "t-grant-line", 2500)
    wait_until(
        lambda: runtime.ledger.status("t-grant-line", overdue_after_ms=60_000).running == 1,
        timeout_s=30,
        what="the slow call to hold the tenant's only slot",
    )
    # Covered by the grant when published: it goes to the broker, and waits for the slot.
    covered = submit_tool(
        app, ctx("t-grant-line", run="run-2"), "write_file", path="covered.txt", content="2"
    )
    assert covered.state != "HELD"
    wait_until(
        lambda: "waiting" in types_of(audit_of(runtime, covered.id)),
        timeout_s=30,
        what="the covered call to wait",
    )
    approvals.revoke("t-grant-line", done.grant_id, "revoked while it waits")
    busy.get(timeout=60)  # type: ignore[attr-defined]
    # Handed the slot, its delivery finds no grant: held for the reviewers again ...
    held = TenantKeys("t-grant-line").held(covered.id)
    wait_until(
        lambda: runtime.state.client.hget(held, "status") == b"held",
        timeout_s=30,
        what="the handed call to be held again",
    )
    # ... and it lets go of the slot and of its wait: nothing runs, and the next call starts
    # at once (it used to wait for the handed slot until max_wait, 10 minutes here).
    record = runtime.ledger.where("t-grant-line", covered.id)
    assert record["where"] == "held"
    assert not {"handoff", "holder", "wait_since", "req"} & record.keys()
    assert runtime.ledger.status("t-grant-line", overdue_after_ms=60_000).running == 0
    other = submit_tool(app, ctx("t-grant-line", run="run-3"), "echo", text="free")
    assert other.get(timeout=30) == {"text": "free"}
    assert "waiting" not in types_of(audit_of(runtime, other.id))
    # Released again, it runs: its earlier wait does not count against its wait limit.
    assert approvals.approve(covered.id, keys["alice"], "again").outcome == "released"
    assert covered.get(timeout=60) == {"path": "covered.txt", "bytes": 1}
    assert verify_audit(runtime) == []


def test_shadowed_and_suggested_tasks_leave_the_ledger_when_they_end(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    def agent(name: str) -> ActionContext:
        return ActionContext(tenant="t-basic", agent=name, run="run-ends")

    shadowed = submit_tool(app, agent("watcher"), "echo", text="watched")
    suggested = submit_tool(app, agent("proposer"), "echo", text="proposed")
    assert shadowed.get(timeout=30)["governance"] == "shadowed"
    assert suggested.get(timeout=30)["governance"] == "suggested"
    # Done where they ended: the reconciler never publishes them again (it used to, forever,
    # each copy writing another entry).
    for result in (shadowed, suggested):
        assert runtime.ledger.where("t-basic", result.id)["where"] == "done"
    assert runtime.ledger.status("t-basic", overdue_after_ms=0).open == 0
    assert types_of(audit_of(runtime, shadowed.id)) == ["shadowed"]
    assert types_of(audit_of(runtime, suggested.id)) == ["suggested"]


def test_a_task_waiting_past_its_limit_fails_naming_the_limit(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    busy = slow_call(app, "t-wait-limit", 6000)
    wait_until(
        lambda: runtime.ledger.status("t-wait-limit", overdue_after_ms=60_000).running == 1,
        timeout_s=30,
        what="the slow call to hold the tenant's only slot",
    )
    patient = slow_call(app, "t-wait-limit", 10)
    with pytest.raises(LimitExceeded, match=r"waited \d+ s for concurrency_limit"):
        patient.get(timeout=60)  # type: ignore[attr-defined]
    assert "wait limit 2 s" in str(patient.result)  # type: ignore[attr-defined]
    assert busy.get(timeout=60)["text"] == "echo: work"  # type: ignore[attr-defined]
    assert types_of(audit_of(runtime, patient.id)) == [  # type: ignore[attr-defined]
        "waiting",
        "task_failed",
    ]


def test_rate_limited_tasks_come_back_spaced_at_the_rate_once_each(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    results = [submit_tool(app, ctx("t-rate"), "echo", text=str(i)) for i in range(5)]
    assert [r.get(timeout=60) for r in results] == [{"text": str(i)} for i in range(5)]
    starts = sorted(
        e.ts_ms for r in results for e in audit_of(runtime, r.id) if e.fields["type"] == "admitted"
    )
    assert len(starts) == 5  # each admitted exactly once: booked, never retried
    # 2 per second, burst 1: the k-th start no sooner than k intervals of 500 ms after the first
    # (each books its turn, 500 ms after the previous turn; a task delivered a little after its
    # turn does not move the next one, so that start and the next may be closer than 500 ms).
    assert all(start - starts[0] >= k * 500 - 50 for k, start in enumerate(starts)), starts
    booked = [
        json.loads(e.fields["detail"])
        for r in results
        for e in audit_of(runtime, r.id)
        if e.fields["type"] == "waiting"
    ]
    assert booked
    assert {d["violation"] for d in booked} == {"rate_limit:tenant"}


def test_eight_processes_never_run_more_than_the_limit(
    app: Celery,
    runtime: GovernanceRuntime,
    observer: ObserverServer,
    e2e_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Two workers of four processes each contend for a tenant's two slots; the test server,
    not the governance layer, counts what runs at once."""
    env = {**os.environ, **e2e_env}
    env.pop("REDIS_URL", None)
    second = WorkerProcess(env, tmp_path / "second.log", concurrency=4, name="second")
    second.start(app)
    try:
        url = f"{observer.base_url}/slow?key=eight&ms=150"
        with governance_context(ctx("t-eight")):
            results = [app.tasks["tools.http_get"].delay(url=url) for _ in range(40)]
        for result in results:
            assert result.get(timeout=120)["status"] == 200
    finally:
        second.stop()
    assert observer.observations.max_in_flight["eight"] == 2
    assert observer.observations.counts["eight"] == 40
