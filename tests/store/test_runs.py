"""Agent runs at admission, on a real Redis (single node and cluster): wall time, the cost
alert, runs in flight, and an attempt settled for a killed step."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from typing import Any

import pytest
import redis

from governance.policy.limits import ViolationType
from governance.policy.long_running import LongRunningLimits
from governance.policy.usage import Usage
from governance.store import Period, StateStore, read_usage
from governance.store.admission import AdmissionStatus, AdmissionTicket, Admitter
from governance.store.keys import TenantKeys
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits, BudgetCheck
from governance.store.usage import stop_run_at_cost_alert
from tests.store.helpers import TOOL_STEP, ctx, envelope, llm, tool

SPAWN = multiprocessing.get_context("spawn")


def _age_run(state: StateStore, run: str, by_ms: int) -> None:
    """Move the run's first step ``by_ms`` into the past (what waiting that long would do)."""
    window = TenantKeys("acme").windows(run)[0]
    started = int(state.client.hget(window, "started_ms"))
    state.client.hset(window, "started_ms", started - by_ms)


def _audit_types(state: StateStore) -> list[dict[str, str]]:
    entries = state.client.xrange(TenantKeys("acme").audit)
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in entries
        if fields.get(b"type") != b"seal"
    ]


def test_a_run_past_its_wall_time_and_grace_is_refused(any_state: StateStore) -> None:
    """Limit 2 s, grace 1 s: at 2.5 s a step is still admitted (within the grace), with a
    wall-time warning audited once; at 3.5 s it is refused with ``wall_time_limit``."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits(wall_time_ms=2000, wall_time_grace_ms=1000)

    def admit(task: str) -> Any:
        return admitter.admit(
            ctx=ctx(run="r-wall"),
            action=tool(),
            task_id=task,
            attempt=0,
            estimate=TOOL_STEP,
            limits=limits,
        )

    first = admit("w1")
    assert first.admitted
    admitter.settle(first.ticket, TOOL_STEP)
    _age_run(any_state, "r-wall", 2500)
    within_grace = admit("w2")
    assert within_grace.admitted
    admitter.settle(within_grace.ticket, TOOL_STEP)
    again = admit("w3")
    assert again.admitted
    admitter.settle(again.ticket, TOOL_STEP)
    warnings = [e for e in _audit_types(any_state) if e["type"] == "limit_warning"]
    assert len(warnings) == 1  # once per run
    assert json.loads(warnings[0]["detail"])["violation"] == "wall_time_limit"

    _age_run(any_state, "r-wall", 1000)  # 3.5 s since the first step
    late = admit("w4")
    assert late.status is AdmissionStatus.REJECTED
    assert late.violation is not None
    assert late.violation.type is ViolationType.wall_time_limit
    # 3.5 s of aged run plus the test's own time since (tens of ms on a loaded machine).
    said = re.fullmatch(r"wall_time_limit exceeded: (\d+) / 2000 \((\d+)%\)", late.reason)
    assert said is not None, late.reason
    elapsed, percent = int(said[1]), int(said[2])
    assert 3500 <= elapsed < 3500 + 10_000
    assert percent == elapsed * 100 // 2000


def test_a_run_at_its_cost_alert_is_held_until_reviewers_approve(any_state: StateStore) -> None:
    """Alert at 1000 micro-USD: a step after the run spent 1200 is held (COST_ALERT, nothing
    taken); with the reviewers' approval it is admitted and the run's threshold moves to the
    policy's next step (2000); rejected at the alert, the run's later steps end."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits(cost_alert_micro=1000)
    run = ctx(run="r-cost")

    def admit(task: str, approved: int | None = None) -> Any:
        return admitter.admit(
            ctx=run,
            action=llm(),
            task_id=task,
            attempt=0,
            estimate=Usage(steps=1, cost_micro_usd=100),
            limits=limits,
            cost_alert_approved=approved,
            template={"tenant": "acme", "run": "r-cost", "task_id": task},
        )

    first = admit("c1")
    assert first.admitted
    admitter.settle(first.ticket, Usage(steps=1, cost_micro_usd=1200))
    held = admit("c2")
    assert held.status is AdmissionStatus.COST_ALERT
    assert held.violation is not None
    assert held.violation.type is ViolationType.cost_alert
    assert "cost alert: run 'r-cost' has cost $0.0012" in held.reason
    assert read_usage(any_state, "acme", Period.DAY).active_leases == 0  # nothing taken

    approved = admit("c2", approved=0)
    assert approved.admitted
    admitter.settle(approved.ticket, Usage(steps=1, cost_micro_usd=300))  # 1500 < 2000
    assert admit("c3").admitted

    stop_run_at_cost_alert(any_state, "acme", "r-cost")
    ended = admit("c4")
    assert ended.status is AdmissionStatus.REJECTED
    assert "reviewers rejected this run at its cost alert" in ended.reason


def test_a_reviewer_can_set_the_runs_next_cost_alert(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(cost_alert_micro=1000)
    first = admitter.admit(
        ctx=ctx(run="r-to"), action=llm(), task_id="a1", attempt=0, estimate=TOOL_STEP,
        limits=limits,
    )  # fmt: skip
    admitter.settle(first.ticket, Usage(steps=1, cost_micro_usd=1000))
    approved = admitter.admit(
        ctx=ctx(run="r-to"), action=llm(), task_id="a2", attempt=0, estimate=TOOL_STEP,
        limits=limits, cost_alert_approved=5000,
    )  # fmt: skip
    assert approved.admitted
    admitter.settle(approved.ticket, Usage(steps=1, cost_micro_usd=3500))  # 4500 < 5000
    assert read_usage(any_state, "acme", Period.RUN, run="r-to").alert_at_micro == 5000
    nxt = admitter.admit(
        ctx=ctx(run="r-to"), action=llm(), task_id="a3", attempt=0, estimate=TOOL_STEP,
        limits=limits,
    )  # fmt: skip
    assert nxt.admitted


def test_a_third_run_waits_until_a_run_is_closed_then_its_steps_run_in_order(
    any_state: StateStore,
) -> None:
    """Two runs in flight allowed: the steps of runs 1 and 2 are admitted (several each), the
    steps of run 3 wait; closing run 1 hands run 3's steps on, oldest first."""
    admitter = Admitter(any_state)
    ledger = Ledger(any_state)
    limits = AdmissionLimits(run_concurrency=2, run_idle_ms=60_000)

    def admit(run: str, task: str) -> Any:
        return admitter.admit(
            ctx=ctx(run=run),
            action=tool(),
            task_id=task,
            attempt=0,
            estimate=TOOL_STEP,
            limits=limits,
            envelope=envelope(task),
        )

    for run in ("r1", "r2"):
        for step in range(3):
            assert admit(run, f"{run}-s{step}").admitted
    waiting = [admit("r3", f"r3-s{step}") for step in range(3)]
    assert {a.status for a in waiting} == {AdmissionStatus.WAITING}
    assert waiting[0].violation is not None
    assert waiting[0].violation.type is ViolationType.run_concurrency_limit
    assert admit("r1", "r1-s3").admitted  # a run in flight goes on

    closed = ledger.sweep("acme", close_run=("r1", "test"))
    assert closed.closed
    assert [p.task_id for p in closed.publish] == ["r3-s0", "r3-s1", "r3-s2"]
    assert admit("r4", "r4-s0").status is AdmissionStatus.WAITING  # r2 and r3 in flight


def test_an_idle_run_leaves_its_slot_to_the_next_run(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    ledger = Ledger(any_state)
    limits = AdmissionLimits(run_concurrency=1, run_idle_ms=300)
    first = admitter.admit(
        ctx=ctx(run="busy"), action=tool(), task_id="i1", attempt=0, estimate=TOOL_STEP,
        limits=limits,
    )  # fmt: skip
    admitter.settle(first.ticket, TOOL_STEP)
    second = admitter.admit(
        ctx=ctx(run="next"), action=tool(), task_id="i2", attempt=0, estimate=TOOL_STEP,
        limits=limits, envelope=envelope("i2"),
    )  # fmt: skip
    assert second.status is AdmissionStatus.WAITING
    deadline = time.monotonic() + 10
    handed: list[str] = []
    while not handed:
        assert time.monotonic() < deadline, "the idle run's slot never went to the next run"
        handed = [p.task_id for p in ledger.sweep("acme").publish]
        time.sleep(0.05)
    assert handed == ["i2"]


def _admit_runs(url: str, worker: int, runs: int, out: Any) -> None:
    client = redis.Redis.from_url(url)
    admitter = Admitter(StateStore(client))
    limits = AdmissionLimits(run_concurrency=3, run_idle_ms=600_000)
    admitted = []
    for n in range(runs):
        run = f"w{worker}-r{n}"
        result = admitter.admit(
            ctx=ctx(run=run), action=tool(), task_id=f"{run}-t", attempt=0, estimate=TOOL_STEP,
            limits=limits, envelope=envelope(f"{run}-t"),
        )  # fmt: skip
        if result.admitted:
            admitted.append(run)
    out.put(admitted)
    client.close()


@pytest.mark.timeout(120)
def test_runs_in_flight_are_exact_across_8_processes(redis_url: str) -> None:
    """80 runs started by 8 processes at once with 3 runs allowed in flight: exactly 3 start."""
    out = SPAWN.Queue()
    workers = [SPAWN.Process(target=_admit_runs, args=(redis_url, w, 10, out)) for w in range(8)]
    for p in workers:
        p.start()
    started = [run for _ in workers for run in out.get(timeout=100)]
    for p in workers:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(started) == 3
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(TenantKeys("acme").runs) == 3
    assert client.zcard(TenantKeys("acme").waiting) == 77


def test_a_killed_step_is_settled_from_outside_with_its_reservation_spent(
    any_state: StateStore,
) -> None:
    """The worker's main process settles an attempt whose pool process it killed: the lease
    goes, the reservation counts as used, the next waiting task is handed on."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "steps", 10),))
    running = admitter.admit(
        ctx=ctx(), action=tool(), task_id="k1", attempt=0, estimate=TOOL_STEP, limits=limits,
        holder="child-that-died",
    )  # fmt: skip
    assert running.admitted
    waiting = admitter.admit(
        ctx=ctx(), action=tool(), task_id="k2", attempt=0, estimate=TOOL_STEP, limits=limits,
        envelope=envelope("k2"),
    )  # fmt: skip
    assert waiting.status is AdmissionStatus.WAITING
    ticket = AdmissionTicket.of(ctx(), "k1", 0, "", limits, {"tenant": "acme", "task_id": "k1"})
    settled = admitter.settle_killed(
        ticket, TOOL_STEP, entry={"type": "task_failed", "decision": "allow", "reason": "killed"}
    )
    assert settled.settled
    assert [p.task_id for p in settled.publish] == ["k2"]
    usage = read_usage(any_state, "acme", Period.DAY)
    assert usage.used.steps == 1
    assert usage.reserved.steps == 1  # k2's, handed on
    again = admitter.settle_killed(
        ticket, TOOL_STEP, entry={"type": "task_failed", "decision": "allow", "reason": "killed"}
    )
    assert not again.settled  # at most once


def test_a_step_waiting_in_line_longer_than_the_idle_timeout_is_not_idle(
    any_state: StateStore,
) -> None:
    """Idle time runs from the run's last activity to when its step came: run A's step that
    waited behind run B's long task for longer than A's idle timeout still runs."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=1, long_running=LongRunningLimits(idle_timeout_s=1))

    def admit(run: str, task: str) -> Any:
        return admitter.admit(
            ctx=ctx(run=run), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP,
            limits=limits, envelope=envelope(task),
        )  # fmt: skip

    a1 = admit("A", "a1")
    admitter.settle(a1.ticket, TOOL_STEP)
    b1 = admit("B", "b1")
    assert b1.admitted
    a2 = admit("A", "a2")
    assert a2.status is AdmissionStatus.WAITING
    came = time.monotonic()
    while time.monotonic() - came < 1.5:  # B's task runs on, past A's idle timeout
        time.sleep(0.05)
    (handed,) = admitter.settle(b1.ticket, TOOL_STEP).publish
    assert handed.task_id == "a2"
    ran = admitter.admit(
        ctx=ctx(run="A"), action=tool(), task_id="a2", attempt=0, estimate=TOOL_STEP,
        limits=limits, handoff=handed.handoff,
    )  # fmt: skip
    assert ran.admitted
    # A step that comes after the run was idle that long is refused, as before.
    admitter.settle(ran.ticket, TOOL_STEP)
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.1:
        time.sleep(0.05)
    late = admit("A", "a3")
    assert late.status is AdmissionStatus.REJECTED
    assert late.violation is not None
    assert late.violation.type is ViolationType.idle_timeout
