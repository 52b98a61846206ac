"""Wait lists, hand-offs and booked turns: real Redis, single node and 3-master cluster."""

from __future__ import annotations

import itertools
import time
from typing import Any

from governance.policy.limits import ViolationType
from governance.store import AuditEvent, AuditEventType, AuditLog, Period, StateStore, read_usage
from governance.store.admission import Admission, AdmissionStatus, Admitter
from governance.store.audit_seal import AuditSealer
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool

ONE_SLOT = AdmissionLimits(concurrency=1)


def admit(
    admitter: Admitter,
    task: str,
    limits: AdmissionLimits = ONE_SLOT,
    *,
    handoff: str | None = None,
    holder: str = "",
) -> Admission:
    return admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id=task,
        attempt=0,
        estimate=TOOL_STEP,
        limits=limits,
        handoff=handoff,
        holder=holder,
        envelope=envelope(task),
    )


def test_waiting_tasks_start_in_the_order_they_began_to_wait(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    running = admit(admitter, "first")
    assert running.admitted
    order = [f"w{i}" for i in range(10)]
    for task in order:
        assert admit(admitter, task).status is AdmissionStatus.WAITING
    started = []
    current = running
    while True:
        settlement = admitter.settle(current.ticket, TOOL_STEP)
        if not settlement.publish:
            break
        (handed,) = settlement.publish  # one slot freed: exactly one task handed on
        assert handed.handoff
        current = admit(admitter, handed.task_id, handoff=handed.handoff)
        assert current.admitted
        started.append(handed.task_id)
    assert started == order


def _server_commands(client: Any) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def test_each_waiting_task_costs_the_same_redis_work_whatever_the_backlog(
    state: StateStore,
) -> None:
    """Redis commands (counted by the server, inside scripts too) per task through the wait
    list: the same at a backlog of 20 as at 400 (within 20 %), because nothing polls."""
    admitter = Admitter(state)
    per_task = []
    for backlog in (20, 400):
        state.client.flushall()
        before = _server_commands(state.client)
        current = admit(admitter, "head")
        for i in range(backlog):
            assert admit(admitter, f"b{i}").status is AdmissionStatus.WAITING
        done = 0
        while True:
            settlement = admitter.settle(current.ticket, TOOL_STEP)
            done += 1
            if not settlement.publish:
                break
            (handed,) = settlement.publish
            current = admit(admitter, handed.task_id, handoff=handed.handoff)
            assert current.admitted
        assert done == backlog + 1
        per_task.append((_server_commands(state.client) - before) / done)
    small, large = per_task
    assert large <= small * 1.2, f"commands per task grew from {small:.1f} to {large:.1f}"


def test_only_the_handed_message_takes_the_kept_slot(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    running = admit(admitter, "first")
    assert admit(admitter, "second").status is AdmissionStatus.WAITING
    (handed,) = admitter.settle(running.ticket, TOOL_STEP).publish
    # A copy of the waiting task's old message (no token, or a wrong one) is dropped.
    assert admit(admitter, "second").status is AdmissionStatus.DUPLICATE
    assert admit(admitter, "second", handoff="second:0:99").status is AdmissionStatus.DUPLICATE
    taken = admit(admitter, "second", handoff=handed.handoff, holder="d1")
    assert taken.admitted
    # The hand-off message delivered twice: the second delivery is a copy.
    assert admit(admitter, "second", handoff=handed.handoff, holder="d2").status is (
        AdmissionStatus.DUPLICATE
    )
    assert read_usage(any_state, "acme", Period.DAY).active_leases == 1


def test_a_hand_off_lost_on_its_way_is_published_again_with_its_token(
    redis_client: object,
) -> None:
    state = StateStore(redis_client, lease_ms=5_000)
    fast = StateStore(
        redis_client,
        lease_ms=5_000,
        timings=type(state.timings)(grace_ms=200),
    )
    admitter = Admitter(fast)
    running = admit(admitter, "first")
    assert admit(admitter, "second").status is AdmissionStatus.WAITING
    (handed,) = admitter.settle(running.ticket, TOOL_STEP).publish
    # The settling worker dies before publishing it: nothing happens until the grace passes.
    ledger = Ledger(fast)
    assert ledger.sweep("acme").publish == ()
    time.sleep(0.25)
    (again,) = ledger.sweep("acme").publish
    assert (again.task_id, again.handoff, again.again) == ("second", handed.handoff, True)
    # The slot stayed kept for it: a newcomer waits, the republished hand-off runs.
    assert admit(admitter, "newcomer").status is AdmissionStatus.WAITING
    assert admit(admitter, "second", handoff=again.handoff).admitted


def test_rate_limited_tasks_book_turns_spaced_at_the_rate(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(tenant_rate=Rate(interval_ms=100, burst=2, rate=10, per_s=1))
    results = [admit(admitter, f"r{i}", limits) for i in range(8)]
    admitted = [r for r in results if r.admitted]
    booked = [r for r in results if r.status is AdmissionStatus.BOOKED]
    assert len(admitted) >= 2
    assert len(admitted) + len(booked) == 8
    turns = [r.turn_ms for r in booked]
    # Each booked task has its own turn, one interval after the one before: no stampede.
    assert all(b - a == 100 for a, b in itertools.pairwise(turns))
    assert all(r.violation and r.violation.type is ViolationType.rate_limit for r in booked)
    # Arriving early is a copy; arriving at its turn, it is admitted without a second token.
    first = booked[0]
    task = first.ticket.task_id
    if first.turn_ms > time.time() * 1000 + 60:
        assert admit(admitter, task, limits).status is AdmissionStatus.EARLY
    time.sleep(max(0.0, first.turn_ms / 1000 - time.time()) + 0.01)
    assert admit(admitter, task, limits).admitted


def test_a_turn_beyond_the_wait_limit_is_refused_with_the_reason(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(
        tenant_rate=Rate(interval_ms=1000, burst=1, rate=1, per_s=1), max_wait_ms=1500
    )
    assert admit(admitter, "a", limits).admitted
    assert admit(admitter, "b", limits).status is AdmissionStatus.BOOKED
    refused = admit(admitter, "c", limits)  # its turn would be ~2 s away
    assert refused.status is AdmissionStatus.REJECTED
    assert "rate_limit" in refused.reason
    assert "wait limit of 1500 ms" in refused.reason


def _denied(task: str) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.AUTHORIZATION_DENIED,
        tenant="acme",
        agent="agent-1",
        run="run-1",
        task_id=task,
        action="echo",
        decision="deny",
        reason="tool 'echo' is not allowed (the policy changed since it was published)",
        policy_version="v2",
    )


def test_a_handed_task_denied_at_its_delivery_gives_back_its_slot_and_leaves_the_ledger(
    any_state: StateStore,
) -> None:
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    log = AuditLog(any_state, AuditSealer(b"test-key"))
    budgeted = AdmissionLimits(concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "steps", 9),))
    running = admit(admitter, "first", budgeted)
    assert admit(admitter, "second", budgeted).status is AdmissionStatus.WAITING
    (handed,) = admitter.settle(running.ticket, TOOL_STEP).publish
    held = read_usage(any_state, "acme", Period.DAY)
    assert (held.active_leases, held.reserved.steps) == (1, 1)  # taken on its behalf
    # Its delivery is denied (or shadowed) by the worker: the entry and the end, one call.
    log.end_task(_denied("second"), ttl_s=60)
    freed = read_usage(any_state, "acme", Period.DAY)
    assert (freed.active_leases, freed.reserved.steps) == (0, 0)
    record = ledger.where("acme", "second")
    assert record["where"] == "done"
    assert not {"handoff", "holder", "wait_since", "req"} & record.keys()
    assert any_state.client.zscore("gov:{acme}:ledger", "gov:{acme}:task:second") is None
    assert [e.fields["type"] for e in log.records("acme")][-1] == "authorization_denied"
    # The slot is free for the next task, and the token of the ended hand-off admits nothing.
    assert admit(admitter, "third", budgeted).admitted
    assert not admit(admitter, "second", budgeted, handoff=handed.handoff).admitted


def test_a_denied_copy_leaves_the_record_of_the_delivery_that_runs_the_task(
    any_state: StateStore,
) -> None:
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    log = AuditLog(any_state, AuditSealer(b"test-key"))
    running = admit(admitter, "first", holder="d1")
    assert running.admitted
    log.end_task(_denied("first"), ttl_s=60)
    assert ledger.where("acme", "first")["where"] == "running"
    assert read_usage(any_state, "acme", Period.DAY).active_leases == 1
    admitter.settle(running.ticket, TOOL_STEP)
    assert ledger.where("acme", "first")["where"] == "done"


def test_a_settlement_right_after_an_outage_hands_on_its_own_slot_but_takes_no_expired_lease(
    redis_client: object,
) -> None:
    state = StateStore(redis_client, lease_ms=300)
    admitter = Admitter(state)
    two = AdmissionLimits(concurrency=2)
    a = admit(admitter, "A", two, holder="a1")
    b = admit(admitter, "B", two, holder="b1")
    assert admit(admitter, "W1", two).status is AdmissionStatus.WAITING
    assert admit(admitter, "W2", two).status is AdmissionStatus.WAITING
    time.sleep(0.4)  # an outage longer than the lease: nobody renewed, every lease looks expired
    # B's settlement is the first call after it; its worker knows of the outage (reclaim off).
    settled = admitter.settle(b.ticket, TOOL_STEP, reclaim=False)
    assert [p.task_id for p in settled.publish] == ["W1"]  # B's own slot, and only that
    # A's holder was only cut off: it renews, and the tenant never runs more than two at once.
    assert admitter.renew(a.ticket) > 0
    assert read_usage(state, "acme", Period.DAY).active_leases == 2


def test_a_task_that_waited_past_midnight_is_judged_against_todays_budget(
    any_state: StateStore,
) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.store.helpers import tokens

    admitter = Admitter(any_state)
    day_tokens = AdmissionLimits(
        concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),)
    )
    yesterday = datetime.now(UTC) - timedelta(days=1)

    def admit_at(task: str, when: datetime | None, **extra: Any) -> Admission:
        return admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=tokens(700),
            limits=day_tokens, envelope=envelope(task), now=when, **extra,
        )  # fmt: skip

    # Today, 800 tokens are spent already.
    today = admit_at("today", None)
    assert today.admitted
    admitter.settle(today.ticket, tokens(800))
    # Yesterday: one call ran, the next waited for the slot (yesterday's windows in its request).
    running = admit_at("late", yesterday)
    assert running.admitted
    assert admit_at("waited", yesterday).status is AdmissionStatus.WAITING
    # The slot frees after midnight. Yesterday's window would still fit it (10 + 700 of 1,000),
    # but it is not handed on against yesterday's windows: it is published without a token, for
    # its own delivery to decide against today's.
    (published,) = admitter.settle(running.ticket, tokens(10)).publish
    assert published.task_id == "waited"
    assert published.handoff is None
    again = admit_at("waited", None)
    assert not again.admitted
    assert again.violation is not None
    assert again.violation.type is ViolationType.token_limit
    used = read_usage(any_state, "acme", Period.DAY).used
    assert used.input_tokens + used.output_tokens == 800  # today's budget holds


def test_a_replayed_rejection_says_why_and_only_a_final_attempt_is_final(
    any_state: StateStore,
) -> None:
    from governance.store.admission import NextAttempt

    admitter = Admitter(any_state)
    tiny = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "steps", 0),))
    rejected = admit(admitter, "over", tiny)
    assert rejected.status is AdmissionStatus.REJECTED
    # The same call again (its reply was lost, the caller replayed it): it ended, and why.
    replay = admit(admitter, "over", tiny)
    assert replay.status is AdmissionStatus.SETTLED
    assert replay.final
    assert replay.reason == rejected.reason
    # An attempt followed by a retry is settled, not final: the task goes on.
    first = admit(admitter, "retried", ONE_SLOT)
    retry = NextAttempt(envelope("retried"), due_ms=0, parked=False)
    admitter.settle(first.ticket, TOOL_STEP, next_attempt=retry)
    copy = admit(admitter, "retried", ONE_SLOT)
    assert copy.status is AdmissionStatus.SETTLED
    assert not copy.final
    admitter.settle(admit(admitter, "done", ONE_SLOT).ticket, TOOL_STEP)
    finished = admit(admitter, "done", ONE_SLOT)
    assert (finished.status, finished.final, finished.reason) == (AdmissionStatus.SETTLED, True, "")


def test_tasks_waiting_across_a_policy_reload_are_decided_under_the_new_limits(
    any_state: StateStore,
) -> None:
    admitter = Admitter(any_state)

    def admit_under(task: str, version: str, concurrency: int) -> Admission:
        return admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP,
            limits=AdmissionLimits(concurrency=concurrency), envelope=envelope(task),
            template={"tenant": "acme", "task_id": task, "policy_version": version},
        )  # fmt: skip

    # v1 allows 3 at once: three run, three wait.
    running = [admit_under(f"r{i}", "v1", 3) for i in range(3)]
    assert all(a.admitted for a in running)
    for task in ("w0", "w1", "w2"):
        assert admit_under(task, "v1", 3).status is AdmissionStatus.WAITING
    # v2 allows 1. A settlement under v2 hands nothing on under v1's limit of 3: the waiting
    # tasks are published without a token, and their deliveries decide under v2.
    settled = admitter.settle(running[0].ticket, TOOL_STEP, policy_version="v2")
    assert sorted(p.task_id for p in settled.publish) == ["w0", "w1", "w2"]
    assert all(p.handoff is None for p in settled.publish)
    for task in ("w0", "w1", "w2"):
        assert admit_under(task, "v2", 1).status is AdmissionStatus.WAITING
    assert read_usage(any_state, "acme", Period.DAY).active_leases == 2  # never more than before
    # Under v2 they go on one at a time, in the order they first waited.
    handed = admitter.settle(running[1].ticket, TOOL_STEP, policy_version="v2").publish
    assert [p.task_id for p in handed] == []  # r2 still runs: 1 running, the limit
    (first,) = admitter.settle(running[2].ticket, TOOL_STEP, policy_version="v2").publish
    assert first.task_id == "w0"
    assert first.handoff


def test_waiting_for_reviewers_is_not_idle_time_of_the_run(any_state: StateStore) -> None:
    from governance.policy.usage import Usage
    from governance.store.held import HeldStore, HeldTask
    from governance.store.limits import LongRunningLimits
    from tests.store.helpers import llm

    def held_task(task: str) -> HeldTask:
        now = int(time.time() * 1000)
        return HeldTask(
            task_id=task, tenant="acme", agent="agent", run="r", user="", task_name="llm",
            args=[], kwargs={}, context={}, action={}, action_name="llm", action_class="llm",
            tier="act_auto", reason="cost alert", call="0" * 64, requested_ms=now,
            expires_ms=now + 3_600_000, envelope={"task": "llm"}, kind="cost_alert",
        )  # fmt: skip

    admitter = Admitter(any_state)
    limits = AdmissionLimits(
        cost_alert_micro=1_000, long_running=LongRunningLimits(idle_timeout_s=1)
    )

    def admit_step(task: str, approved: int | None = None) -> Admission:
        return admitter.admit(
            ctx=ctx(run="r"), action=llm(), task_id=task, attempt=0,
            estimate=Usage(steps=1, cost_micro_usd=100), limits=limits,
            cost_alert_approved=approved, envelope=envelope(task),
        )  # fmt: skip

    first = admit_step("c1")
    assert first.admitted
    admitter.settle(first.ticket, Usage(steps=1, cost_micro_usd=1_200))
    # The run's cost reached its alert: the next step is held for the reviewers ...
    assert admit_step("c2").status is AdmissionStatus.COST_ALERT
    HeldStore(any_state).put(held_task("c2"), audit={"tenant": "acme", "task_id": "c2"})
    time.sleep(1.3)  # ... who take longer than the run's idle timeout to approve.
    released = admit_step("c2", approved=0)
    assert released.admitted, released.reason
    # A step that comes after a real second of nothing is idle all the same.
    admitter.settle(released.ticket, Usage(steps=1))
    time.sleep(1.3)
    late = admit_step("c3", approved=0)
    assert late.status is AdmissionStatus.REJECTED
    assert "idle_timeout" in late.reason


def test_a_new_runs_fan_out_does_not_hide_a_waiting_step_of_a_run_in_flight(
    any_state: StateStore,
) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=2, run_concurrency=2, run_idle_ms=60_000)

    def admit_step(run: str, task: str) -> Admission:
        return admitter.admit(
            ctx=ctx(run=run), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP,
            limits=limits, envelope=envelope(task),
        )  # fmt: skip

    r1, r2 = admit_step("r1", "r1-s0"), admit_step("r2", "r2-s0")
    assert r1.admitted
    assert r2.admitted
    # A third run fans out more steps than a hand-off looks at (a run slot each, once a
    # concurrency slot frees: none is free while r1 and r2 are in flight).
    fan_out = [admit_step("r3", f"r3-s{i}") for i in range(12)]
    assert all(a.status is AdmissionStatus.WAITING for a in fan_out)
    # r1's next step waits behind them, for the tenant's concurrency.
    assert admit_step("r1", "r1-s1").status is AdmissionStatus.WAITING
    # r1's running step ends: its slot goes to r1's waiting step (its run is in flight).
    (handed,) = admitter.settle(r1.ticket, TOOL_STEP).publish
    assert handed.task_id == "r1-s1"
    assert handed.handoff


def test_a_task_that_ended_is_never_held_again(any_state: StateStore) -> None:
    """Attack 2 at the store: a copy of a released task that already ran (a plain copy of its
    message, or its release replayed) is not held again; the hold stays released, the copy is
    audited as release_replayed. While the task has not ended, holding it again is allowed (a
    release that expired while it waited)."""
    from governance.store.audit import AuditLog
    from governance.store.held import HeldStatus, HeldStore, HeldTask

    def held(task: str) -> HeldTask:
        now = int(time.time() * 1000)
        return HeldTask(
            task_id=task, tenant="acme", agent="agent", run="r", user="dana", task_name="t",
            args=[], kwargs={}, context={}, action={}, action_name="t", action_class="t",
            tier="act_with_approval", reason="held", call="0" * 64, requested_ms=now,
            expires_ms=now + 3_600_000, envelope={"task": "t"},
        )  # fmt: skip

    store = HeldStore(any_state)
    audit = {"tenant": "acme", "task_id": "x"}
    for task in ("ran", "waits"):
        assert store.put(held(task), audit={**audit, "task_id": task}) == "created"
        any_state.client.hset(f"gov:{{acme}}:held:{task}", "status", "released")
    any_state.client.hset("gov:{acme}:task:ran", mapping={"where": "done", "settled": 1})
    any_state.client.hset("gov:{acme}:task:waits", mapping={"where": "waiting"})
    assert store.put(held("ran"), audit={**audit, "task_id": "ran"}) == "ended"
    assert store.get("acme", "ran").status is HeldStatus.RELEASED  # type: ignore[union-attr]
    assert store.put(held("waits"), audit={**audit, "task_id": "waits"}) == "reheld"
    types = [e.fields["type"] for e in AuditLog.with_key(any_state, b"k").records("acme")]
    assert "release_replayed" in types
    any_state.client.delete("gov:{acme}:task:waits")  # a record gone counts as ended
    any_state.client.hset("gov:{acme}:held:waits", "status", "released")
    assert store.put(held("waits"), audit={**audit, "task_id": "waits"}) == "ended"
