"""Admission and settlement on a real Redis, single node and 3-master cluster alike."""

from __future__ import annotations

import time

from governance.policy.limits import ViolationType
from governance.policy.long_running import LongRunningLimits
from governance.policy.usage import Usage
from governance.store import Period, StateStore, read_usage
from governance.store.admission import Admission, AdmissionStatus, Admitter, NextAttempt
from governance.store.limits import AdmissionLimits, BudgetCheck
from tests.store.helpers import TOOL_STEP, ctx, envelope, llm, task_id, tokens, tool


def test_admitted_task_holds_a_lease_until_settled(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=1)
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t1", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert first.status is AdmissionStatus.ADMITTED
    second = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="t2",
        attempt=0,
        estimate=TOOL_STEP,
        limits=limits,
        envelope=envelope("t2"),
    )
    assert second.status is AdmissionStatus.WAITING
    assert second.violation is not None
    assert second.violation.type is ViolationType.concurrency_limit
    assert second.first_wait

    settled = admitter.settle(first.ticket, TOOL_STEP)
    assert settled.settled
    # The freed slot is handed to the waiting task: its message comes back with a token.
    (handed,) = settled.publish
    assert handed.task_id == "t2"
    assert handed.handoff
    # Another task arriving now finds the slot taken by the hand-off.
    late = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t3", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert late.status is AdmissionStatus.WAITING
    third = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="t2",
        attempt=0,
        estimate=TOOL_STEP,
        limits=limits,
        handoff=handed.handoff,
    )
    assert third.status is AdmissionStatus.ADMITTED


def test_same_attempt_admitted_and_settled_twice_counts_once(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(
        concurrency=5, budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),)
    )
    call = llm()

    def admit(holder: str) -> Admission:
        return admitter.admit(
            ctx=ctx(),
            action=call,
            task_id="t1",
            attempt=0,
            estimate=tokens(100),
            limits=limits,
            holder=holder,
        )

    first = admit("delivery-1")
    replay = admit("delivery-1")  # the same call sent again (a client retry after a timeout)
    assert first.status is AdmissionStatus.ADMITTED
    assert replay.status is AdmissionStatus.ADMITTED
    day = read_usage(any_state, "acme", Period.DAY)
    assert day.active_leases == 1
    assert day.reserved.output_tokens == 100

    # A second copy of the message (e.g. redelivered by the broker) is dropped: never twice at
    # once (the ledger publishes the task again if its holder dies).
    copy = admit("delivery-2")
    assert copy.status is AdmissionStatus.DUPLICATE
    assert read_usage(any_state, "acme", Period.DAY).reserved.output_tokens == 100

    assert admitter.settle(first.ticket, tokens(60)).settled
    assert not admitter.settle(replay.ticket, tokens(60)).settled
    day = read_usage(any_state, "acme", Period.DAY)
    run = read_usage(any_state, "acme", Period.RUN, run="run-1")
    for snapshot in (day, run):
        assert snapshot.used == Usage(steps=1, output_tokens=60)
        assert snapshot.reserved == Usage()
        assert snapshot.active_leases == 0

    # A redelivery after settlement is recognised: its body must not run a second time.
    assert admit("delivery-3").status is AdmissionStatus.SETTLED
    assert read_usage(any_state, "acme", Period.DAY).used.output_tokens == 60


def test_a_holder_that_lost_its_lease_settles_late_without_touching_the_new_one(
    redis_client: object,
) -> None:
    state = StateStore(redis_client, lease_ms=300)
    admitter = Admitter(state)
    # (Reservations are kept in the windows that have a budget.)
    limits = AdmissionLimits(
        concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "tokens", 10_000),)
    )

    def admit(holder: str) -> Admission:
        return admitter.admit(
            ctx=ctx(),
            action=llm(),
            task_id="t1",
            attempt=0,
            estimate=tokens(100),
            limits=limits,
            holder=holder,
        )

    stalled = admit("slow")
    assert stalled.admitted
    taken_over = None
    deadline = time.monotonic() + 5
    while taken_over is None or not taken_over.admitted:  # until the stalled lease expires
        assert time.monotonic() < deadline, "the stalled holder's lease never expired"
        time.sleep(0.01)
        taken_over = admit("fresh")
    assert admitter.renew(stalled.ticket) == 0  # the stalled holder cannot extend it back

    late = admitter.settle(stalled.ticket, tokens(70))
    assert late.settled
    assert late.late
    assert not admitter.settle(stalled.ticket, tokens(70)).settled  # and only once
    day = read_usage(state, "acme", Period.DAY)
    assert day.active_leases == 1  # the fresh holder still runs
    assert day.reserved.output_tokens == 100
    assert admitter.settle(taken_over.ticket, tokens(30)).settled
    day = read_usage(state, "acme", Period.DAY)
    assert day.used.output_tokens == 100
    assert day.used.steps == 2
    assert day.active_leases == 0


def test_a_retry_is_a_new_attempt_with_its_own_lease(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=1)
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t1", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    retry_at = NextAttempt(envelope("t1"), int(time.time() * 1000), parked=False)
    admitter.settle(first.ticket, TOOL_STEP, next_attempt=retry_at)
    retry = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t1", attempt=1, estimate=TOOL_STEP, limits=limits
    )
    assert retry.status is AdmissionStatus.ADMITTED
    admitter.settle(retry.ticket, TOOL_STEP)
    assert read_usage(any_state, "acme", Period.RUN, run="run-1").used.steps == 2


def test_an_attempt_nobody_scheduled_never_runs(any_state: StateStore) -> None:
    """A copy of a task's message with its attempt number raised (a replayed release, say): after
    a final settlement, and past the one retry that was scheduled, it is dropped as settled."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits()

    def admit(task: str, attempt: int) -> AdmissionStatus:
        admission = admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=attempt, estimate=TOOL_STEP,
            limits=limits,
        )  # fmt: skip
        if admission.admitted:
            admitter.settle(admission.ticket, TOOL_STEP)
        return admission.status

    assert admit("done", 0) is AdmissionStatus.ADMITTED
    assert admit("done", 1) is AdmissionStatus.SETTLED
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="retried", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    retry_at = NextAttempt(envelope("retried"), int(time.time() * 1000), parked=False)
    admitter.settle(first.ticket, TOOL_STEP, next_attempt=retry_at)
    assert admit("retried", 2) is AdmissionStatus.SETTLED  # one retry was scheduled, not two
    assert admit("retried", 1) is AdmissionStatus.ADMITTED
    assert read_usage(any_state, "acme", Period.RUN, run="run-1").used.steps == 3


def test_a_later_attempt_needs_the_marker_its_settlement_wrote(any_state: StateStore) -> None:
    """Attack 2 at the store: "attempt + 1 of a settled record that is not done" is not enough
    (a copy re-held the record, or someone wrote it so); only the settlement that scheduled the
    retry lets it run, and a later attempt of a task with no record never runs."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits()
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="reopened", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    admitter.settle(first.ticket, TOOL_STEP)
    record = "gov:{acme}:task:reopened"
    any_state.client.hset(record, mapping={"where": "held", "settled": 1})  # not done any more
    replay = admitter.admit(
        ctx=ctx(), action=tool(), task_id="reopened", attempt=1, estimate=TOOL_STEP, limits=limits
    )
    assert replay.status is AdmissionStatus.SETTLED
    assert replay.replayed
    unknown = admitter.admit(
        ctx=ctx(), action=tool(), task_id="never-seen", attempt=3, estimate=TOOL_STEP, limits=limits
    )
    assert (unknown.status, unknown.replayed) == (AdmissionStatus.SETTLED, True)
    assert read_usage(any_state, "acme", Period.RUN, run="run-1").used.steps == 1


def test_settling_an_unknown_task_is_a_no_op(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    admitted = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="known",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
    )
    stranger = type(admitted.ticket)(
        tenant="acme",
        task_id="never-admitted",
        attempt=0,
        holder="nobody",
        windows=admitted.ticket.windows,
        checks=(),
        warning_threshold_pct=80,
    )
    assert not admitter.settle(stranger, TOOL_STEP).settled
    assert read_usage(any_state, "acme", Period.DAY).used == Usage()


def test_exhausted_budget_rejects_and_reservations_in_flight_wait(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "tokens", 300),))
    running = [
        admitter.admit(
            ctx=ctx(), action=llm(), task_id=f"t{i}", attempt=0, estimate=tokens(100), limits=limits
        )
        for i in range(3)
    ]
    assert all(a.admitted for a in running)
    pressured = admitter.admit(
        ctx=ctx(),
        action=llm(),
        task_id="t3",
        attempt=0,
        estimate=tokens(100),
        limits=limits,
        envelope=envelope("t3"),
    )
    # Over only because of reservations of tasks in flight: waiting may help.
    assert pressured.status is AdmissionStatus.WAITING
    assert pressured.violation is not None
    assert pressured.violation.message == "token_limit exceeded: 400 / 300 (133%)"

    published = []
    for admission in running:
        published += admitter.settle(admission.ticket, tokens(100)).publish
    # The settlements spent the budget: the waiting task is published so that its own delivery
    # ends it (a task always ends on a worker, with its result), without a hand-off token.
    assert [(p.task_id, p.handoff) for p in published] == [("t3", None)]
    exhausted = admitter.admit(
        ctx=ctx(), action=llm(), task_id="t3", attempt=0, estimate=tokens(100), limits=limits
    )
    # Used up for the period: waiting does not help, the task fails with the violation.
    assert exhausted.status is AdmissionStatus.REJECTED
    assert exhausted.violation is not None
    assert exhausted.violation.message == "token_limit exceeded: 400 / 300 (133%)"


def test_usage_above_the_reservation_counts_and_the_next_admission_sees_it(
    any_state: StateStore,
) -> None:
    """A provider that reports more than the call reserved: the excess is counted in the
    window (never clamped to the reservation), so the budget's next admission sees it."""
    admitter = Admitter(any_state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),))
    reserved = Usage(steps=1, input_tokens=40, output_tokens=10)
    first = admitter.admit(
        ctx=ctx(), action=llm(), task_id="t1", attempt=0, estimate=reserved, limits=limits
    )
    assert first.admitted
    assert admitter.settle(first.ticket, Usage(steps=1, input_tokens=900, output_tokens=2)).settled
    snapshot = read_usage(any_state, "acme", Period.DAY)
    assert (snapshot.used.input_tokens, snapshot.used.output_tokens) == (900, 2)
    assert snapshot.reserved == Usage()

    # 902 used: 902 + 117 is over the limit, though the reservation was only 50.
    refused = admitter.admit(
        ctx=ctx(), action=llm(), task_id="t2", attempt=0, estimate=tokens(117), limits=limits
    )
    assert refused.status is AdmissionStatus.REJECTED
    assert refused.violation is not None
    assert refused.violation.message == "token_limit exceeded: 1019 / 1000 (101%)"
    # 902 + 98 fits exactly.
    allowed = admitter.admit(
        ctx=ctx(), action=llm(), task_id="t3", attempt=0, estimate=tokens(98), limits=limits
    )
    assert allowed.admitted


def test_warning_at_admission_and_once_when_settlement_crosses_threshold(
    any_state: StateStore,
) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.RUN, "steps", 10),))
    warned_at_settlement = []
    for i in range(9):
        admission = admitter.admit(
            ctx=ctx(), action=tool(), task_id=f"t{i}", attempt=0, estimate=TOOL_STEP, limits=limits
        )
        assert admission.status is AdmissionStatus.ADMITTED
        # The 8th step is the first at 80 % of the limit.
        assert bool(admission.warnings) == (i + 1 >= 8)
        settlement = admitter.settle(admission.ticket, TOOL_STEP)
        warned_at_settlement += [(i, w.message) for w in settlement.warnings]
    assert warned_at_settlement == [(7, "step_limit at 80%: 8 / 10")]


def test_cost_budget_is_exact_in_micro_dollars(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.MONTH, "cost", 1_000_000),))
    step = Usage(steps=1, cost_micro_usd=250_000)
    admitted = 0
    for i in range(6):
        admission = admitter.admit(
            ctx=ctx(), action=llm(), task_id=f"t{i}", attempt=0, estimate=step, limits=limits
        )
        if admission.admitted:
            admitted += 1
            admitter.settle(admission.ticket, step)
        else:
            assert admission.violation is not None
            assert admission.violation.message == "cost_limit exceeded: $1.25 / $1.00 (125%)"
    assert admitted == 4


def test_long_running_limits_of_a_run(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(
        long_running=LongRunningLimits(
            max_discovered_steps=2, max_discovery_depth=2, max_same_step_repetitions=3
        )
    )

    def admit(task: str, depth: int = 0, **payload: object) -> AdmissionStatus:
        admission = admitter.admit(
            ctx=ctx(depth=depth),
            action=tool(**payload),
            task_id=task,
            attempt=0,
            estimate=TOOL_STEP,
            limits=limits,
        )
        if admission.admitted:
            admitter.settle(admission.ticket, TOOL_STEP)
        return admission.status

    assert admit("too-deep", depth=3) is AdmissionStatus.REJECTED
    assert admit("d1", depth=1) is AdmissionStatus.ADMITTED
    assert admit("d2", depth=2) is AdmissionStatus.ADMITTED
    assert admit("d3", depth=1) is AdmissionStatus.REJECTED  # a third discovered step

    # The same tool with the same input: three times is fine, the fourth is a loop.
    for i in range(3):
        assert admit(f"same-{i}", q="x") is AdmissionStatus.ADMITTED
    assert admit("same-3", q="x") is AdmissionStatus.REJECTED
    assert admit("different", q="y") is AdmissionStatus.ADMITTED


def test_renewal_extends_the_lease_and_fails_once_settled(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    admission = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id=task_id(),
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(concurrency=1),
    )
    renewed = admitter.renew(admission.ticket)
    assert renewed >= admission.lease_expiry_ms
    admitter.settle(admission.ticket, TOOL_STEP)
    assert admitter.renew(admission.ticket) == 0
