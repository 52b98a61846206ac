"""Fair dispatch at the store, on a single Redis and a 3-master cluster: the pool gives freed
capacity to the tenant furthest below its weighted fair share, charged by what its tasks cost;
tasks wait from publication; tenants hand on exactly what the pool grants them.

These prove the arithmetic and the accounting with exact counts (no worker, no timing); the
end-to-end scenarios are in tests/e2e/test_e2e_fair_dispatch.py and the figures in make bench.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from governance.policy.fairness import (
    FairShare,
    batch_size,
    finish_tag,
    in_flight_bound,
    running_mean,
    shares,
    start_tag,
)
from governance.store import StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.audit import AuditEvent, AuditEventType, AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.keys import PoolKeys, TenantKeys
from governance.store.ledger import Ledger, TenantLoad
from governance.store.limits import AdmissionLimits
from governance.store.pool import Completion, Pools, Returned
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool

QUEUE = "q-fair"


def pools(state: StateStore, **fair: object) -> Pools:
    return Pools(state, FairShare(**fair))  # type: ignore[arg-type]


def serve(
    pool: Pools,
    costs: dict[str, float],
    *,
    rounds: int,
    weights: dict[str, float] | None = None,
) -> Counter[str]:
    """Every tenant backlogged; each round, one dispatched task ends (charged its tenant's
    cost) and the pool gives the freed capacity out again: how many dispatches each got."""
    weights = weights or {}
    register = [(t, weights.get(t, 1.0)) for t in costs]
    given: Counter[str] = Counter()
    grant = pool.dispatch(QUEUE, register=register, saturate=True)
    in_flight: list[tuple[str, str]] = []
    for _ in range(rounds):
        assert grant.tenant is not None
        given[grant.tenant] += len(grant.grants)
        in_flight += [(grant.tenant, g) for g in grant.grants]
        tenant, token = in_flight.pop(0)
        cost = costs[tenant]
        grant = pool.dispatch(
            QUEUE, completed=Completion(tenant, cost, cost, token), register=register
        )
    return given


def test_the_pure_arithmetic() -> None:
    assert start_tag(10.0, 4.0) == 10.0
    assert start_tag(10.0, 14.0) == 14.0
    assert finish_tag(10.0, 1000.0, 4.0) == 260.0
    assert batch_size(100, 500.0, free=8) == 1  # long tasks one by one
    assert batch_size(100, 10.0, free=8) == 8  # short ones in batches, within what is free
    assert batch_size(100, 10.0, free=0) == 0
    assert in_flight_bound(4, 1, 100, 500.0) == 8  # capacity plus the prefetch
    assert in_flight_bound(4, 1, 100, 10.0) == 44  # plus 100 ms of work per process
    assert running_mean(None, 5.0) == 5.0
    assert running_mean(10.0, 20.0) == 12.0
    assert shares({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    fair = FairShare(by="tokens", tool_call_tokens=500)
    assert fair.cost(run_ms=10, tokens=0, tool_call=True) == 500
    assert fair.cost(run_ms=10, tokens=1200, tool_call=False) == 1200
    assert FairShare(by="tasks").cost(run_ms=999, tokens=9, tool_call=False) == 1


def test_capacity_is_the_live_workers_pool_sizes(any_state: StateStore) -> None:
    pool = pools(any_state)
    assert pool.heartbeat(QUEUE, "w1", 4, 60_000) == 4
    assert pool.heartbeat(QUEUE, "w2", 2, 60_000) == 6
    assert pool.heartbeat(QUEUE, "w3", 8, -1) == 6  # expired at once: a dead worker
    assert pool.state(QUEUE).capacity == 6
    assert pool.heartbeat(QUEUE, "w1", 0, 60_000) == 2  # it left
    assert pools(any_state, capacity={QUEUE: 16}).state(QUEUE).capacity == 16


def test_weights_1_2_4_share_dispatches_within_one_round(any_state: StateStore) -> None:
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 4})
    costs = {"w1": 100.0, "w2": 100.0, "w4": 100.0}
    given = serve(pool, costs, rounds=700, weights={"w1": 1, "w2": 2, "w4": 4})
    total = sum(given.values())
    for tenant, weight in (("w1", 1), ("w2", 2), ("w4", 4)):
        assert abs(given[tenant] - total * weight / 7) <= weight, given


def test_worker_time_is_what_is_shared_not_tasks(any_state: StateStore) -> None:
    """Equal weights: a tenant of 2 s calls and one of 0.2 s calls each get half of the worker
    time, so the short one runs about ten calls for each of the long one's."""
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 4})
    costs = {"long": 2000.0, "short": 200.0}
    given = serve(pool, costs, rounds=660)
    time_long, time_short = given["long"] * 2000, given["short"] * 200
    assert abs(time_long / (time_long + time_short) - 0.5) < 0.05, given
    assert 8 <= given["short"] / given["long"] <= 12, given


def test_counting_tasks_shares_tasks(any_state: StateStore) -> None:
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 4}, by="tasks")
    given = serve(pool, {"long": 1.0, "short": 1.0}, rounds=200)
    assert abs(given["long"] - given["short"]) <= 1, given


def test_the_pool_never_grants_beyond_its_bound_and_grants_come_back(any_state: StateStore) -> None:
    pool = pools(any_state, slack_ms=100, capacity={QUEUE: 4})
    first = pool.dispatch(QUEUE, register=[("a", 1.0)], saturate=True)
    granted = list(first.grants)
    while True:
        more = pool.dispatch(QUEUE)
        if not more.grants:
            break
        granted += more.grants
    # 1 s per task by default: the bound is the capacity plus the prefetch.
    assert len(granted) == in_flight_bound(4, 1, 100, 1000.0) == 8
    assert pool.state(QUEUE).in_flight == 8
    again = pool.dispatch(QUEUE, completed=Completion("a", 1000, 1000, granted[0]))
    assert len(again.grants) == 1
    back = pool.dispatch(QUEUE, returned=Returned("a", tuple(granted[1:3]), done=False), give=False)
    assert back.in_flight == 6


def test_a_tenant_its_own_limits_block_keeps_its_place_until_one_of_its_tasks_ends(
    any_state: StateStore,
) -> None:
    """Given capacity while its concurrency is taken by its own tasks in flight, a tenant gives
    it back and is passed over (the next tenant gets it), but keeps its start tag: once one of
    its tasks ends it is served first again, so its share is not lost meanwhile."""
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 4})
    first = pool.dispatch(QUEUE, register=[("a", 1.0), ("b", 1.0)], saturate=True)
    assert first.tenant == "a"
    passed = pool.dispatch(
        QUEUE, returned=Returned("a", first.grants, done=True, blocked=True), give=True
    )
    assert passed.tenant == "b"
    ready = PoolKeys(QUEUE).ready
    assert any_state.client.zscore(ready, "a") is not None  # still in line
    assert pool.dispatch(QUEUE, give=True).tenant == "b"  # "a" is passed over while blocked
    back = pool.dispatch(QUEUE, completed=Completion("a", 1000, 1000), give=True)
    assert back.tenant == "a"  # its task ended: its place (the smallest tag) serves it first


def test_a_tenant_with_nothing_left_leaves_and_the_pool_stops_being_saturated(
    any_state: StateStore,
) -> None:
    pool = pools(any_state, capacity={QUEUE: 4})
    grant = pool.dispatch(QUEUE, register=[("a", 1.0)])
    assert grant.saturated  # a tenant waits for it
    assert grant.tenant == "a"
    done = pool.dispatch(QUEUE, returned=Returned("a", grant.grants, done=True), give=False)
    assert not done.saturated
    assert pool.saturated([QUEUE]) == {QUEUE: False}
    assert pool.state(QUEUE).waiting_tenants == ()


def test_a_newcomer_is_served_before_a_tenant_far_ahead(any_state: StateStore) -> None:
    """A tenant that starts to wait is served from the pool's virtual time: it does not wait
    behind another's backlog, nor bank a share while it was idle."""
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 64})
    for _ in range(50):
        assert pool.dispatch(QUEUE, register=[("a", 1.0)], saturate=True).tenant == "a"
    served = [pool.dispatch(QUEUE, register=[("b", 1.0)]).tenant for _ in range(6)]
    assert served[0] == "b"
    assert Counter(served) == {"a": 3, "b": 3}


def test_a_tenant_that_used_the_idle_pool_is_not_passed_over_for_it_once_others_wait(
    any_state: StateStore,
) -> None:
    """Tasks that ran while nobody waited for the pool took nothing from anyone: once another
    tenant waits, the two share the pool from there, the first is not passed over until the
    other has caught up with everything it ran alone."""
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 64})
    for _ in range(50):
        pool.dispatch(QUEUE, completed=Completion("a", 1000.0, 1000.0), give=False)
    assert pool.saturated([QUEUE]) == {QUEUE: False}
    served = [pool.dispatch(QUEUE, register=[("b", 1.0), ("a", 1.0)]).tenant for _ in range(6)]
    assert Counter(served) == {"a": 3, "b": 3}, served


def test_tasks_that_were_in_the_broker_when_others_began_to_wait_are_charged(
    any_state: StateStore,
) -> None:
    """What a tenant's tasks still in the broker ran after another began to wait is its share:
    the other is served first until it has had as much."""
    pool = pools(any_state, slack_ms=1, capacity={QUEUE: 64})
    pool.dispatch(QUEUE, register=[("b", 1.0)], give=False)
    for _ in range(4):
        pool.dispatch(QUEUE, completed=Completion("a", 1000.0, 1000.0), give=False)
    served = [pool.dispatch(QUEUE, register=[("a", 1.0)]).tenant for _ in range(6)]
    assert served[:4] == ["b"] * 4, served


def test_a_task_waits_from_publication_and_is_handed_on_with_a_grant(
    any_state: StateStore,
) -> None:
    """What a publisher does when the pool is saturated: record the task, see that it must
    wait, and admit it at publication into its tenant's wait list (never the broker); the
    pool's grant then hands it on, and its settlement gives the grant back."""
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    pool = pools(any_state, capacity={QUEUE: 4})
    limits = AdmissionLimits(concurrency=8)
    load = ledger.record_published("acme", "p1", envelope("p1"))
    assert load == TenantLoad(running=0, queued=1, waiting=0)
    assert not load.must_wait(8)
    waited = admitter.admit(
        ctx=ctx(), action=tool(), task_id="p1", attempt=0, estimate=TOOL_STEP, limits=limits,
        at_publish=True, pool_wait=True, queue=QUEUE,
    )  # fmt: skip
    assert waited.status is AdmissionStatus.WAITING
    assert waited.violation is not None
    assert waited.violation.type.value == "pool_saturated"
    keys = TenantKeys("acme")
    assert any_state.client.zcard(keys.queued) == 0  # not in the broker
    grant = pool.dispatch(QUEUE, register=[("acme", 1.0)], saturate=True)
    assert grant.tenant == "acme"
    dispatched = ledger.dispatch("acme", grant.grants, queue=QUEUE)
    assert dispatched.used == 1
    (handed,) = dispatched.publish
    assert handed.handoff
    arrived = admitter.admit(
        ctx=ctx(), action=tool(), task_id="p1", attempt=0, estimate=TOOL_STEP, limits=limits,
        handoff=handed.handoff, pool_gated=True,
    )  # fmt: skip
    assert arrived.admitted
    settled = admitter.settle(arrived.ticket, TOOL_STEP, run_ms=120, pool_gated=True)
    assert settled.pool_grant == grant.grants[0]
    pool.dispatch(QUEUE, completed=Completion("acme", 120, 120, settled.pool_grant), give=False)
    assert pool.state(QUEUE).in_flight == len(grant.grants) - 1


def test_at_publication_a_task_that_may_run_is_handed_a_slot_and_one_over_its_concurrency_waits(
    any_state: StateStore,
) -> None:
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    limits = AdmissionLimits(concurrency=1)

    def publish(task: str) -> AdmissionStatus:
        ledger.record_published("acme", task, envelope(task))
        return admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP,
            limits=limits, at_publish=True,
        ).status  # fmt: skip

    assert publish("h1") is AdmissionStatus.HANDED
    assert publish("h2") is AdmissionStatus.WAITING
    load = ledger.record_published("acme", "h3", envelope("h3"))
    assert load.must_wait(1)  # one running (handed), one waiting: the publisher would wait


def test_a_hand_off_counts_the_tenants_tasks_still_in_the_broker(any_state: StateStore) -> None:
    """Concurrency 2: t1 and t2 go to the broker, t3 and t4 wait. When t1 settles while t2 is
    still in the broker, one slot is free, not two: t3 is handed on, t4 keeps waiting, and t2,
    published before both, runs when it arrives (it used to find its slot taken and wait)."""
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    limits = AdmissionLimits(concurrency=2)

    def publish(task: str) -> AdmissionStatus | None:
        load = ledger.record_published("acme", task, envelope(task))
        if not load.must_wait(2):
            return None  # straight to the broker
        return admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP,
            limits=limits, at_publish=True,
        ).status  # fmt: skip

    def deliver(task: str) -> Any:
        return admitter.admit(
            ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP, limits=limits
        )

    assert [publish(t) for t in ("t1", "t2", "t3", "t4")] == [
        None,
        None,
        AdmissionStatus.WAITING,
        AdmissionStatus.WAITING,
    ]
    first = deliver("t1")
    assert first.admitted
    settled = admitter.settle(first.ticket, TOOL_STEP)
    assert [p.task_id for p in settled.publish] == ["t3"]
    assert deliver("t2").admitted
    assert any_state.client.zcard(TenantKeys("acme").waiting) == 1  # t4


def test_a_task_that_ends_at_the_worker_without_admission_leaves_the_tenants_broker_count(
    any_state: StateStore,
) -> None:
    """Denied or shadowed at the worker, a task no longer counts against its tenant's
    concurrency as one in the broker (it did until the count's 60 s horizon: a tenant of
    concurrency 2 then ran one task at a time after a shadowed one)."""
    ledger = Ledger(any_state)
    log = AuditLog(any_state, AuditSealer(b"fair-test"))
    ledger.record_published("acme", "shadowed", envelope("shadowed"))
    assert ledger.record_published("acme", "next", envelope("next")).queued == 2
    log.end_task(
        AuditEvent(type=AuditEventType.SHADOWED, tenant="acme", task_id="shadowed"),
        any_state.ttl.task_s,
    )
    assert any_state.client.zrange(TenantKeys("acme").queued, 0, -1) == [
        TenantKeys("acme").task("next").encode()
    ]
    assert not ledger.record_published("acme", "third", envelope("third")).must_wait(3)


def test_a_gated_settlement_hands_nothing_on_and_says_who_waits(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    limits = AdmissionLimits(concurrency=1)
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="g1", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    second = admitter.admit(
        ctx=ctx(), action=tool(), task_id="g2", attempt=0, estimate=TOOL_STEP, limits=limits,
        envelope=envelope("g2"),
    )  # fmt: skip
    assert second.status is AdmissionStatus.WAITING
    settled = admitter.settle(first.ticket, TOOL_STEP, pool_gated=True, run_ms=5)
    assert settled.publish == ()
    assert settled.waiting == 1
    minute = int(any_state.client.time()[0]) // 60
    busy = any_state.client.hget(TenantKeys("acme").meta, f"busy:{minute}")
    assert busy is not None
    assert int(busy) >= 5


def test_a_paused_tenant_waits_and_its_tasks_are_never_handed_on(any_state: StateStore) -> None:
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    any_state.client.hset(TenantKeys("acme").meta, "ctl_paused", "1")
    paused = admitter.admit(
        ctx=ctx(), action=tool(), task_id="z1", attempt=0, estimate=TOOL_STEP,
        limits=AdmissionLimits(), envelope=envelope("z1"),
    )  # fmt: skip
    assert paused.status is AdmissionStatus.WAITING
    assert paused.violation is not None
    assert paused.violation.type.value == "paused"
    blocked = ledger.dispatch("acme", ["acme:1"])
    assert (blocked.used, blocked.blocked) == (0, True)
    any_state.client.hdel(TenantKeys("acme").meta, "ctl_paused")
    resumed = ledger.dispatch("acme", ["acme:2"])
    assert resumed.used == 1


def test_a_concurrency_override_is_in_force_until_it_ends(any_state: StateStore) -> None:
    admitter = Admitter(any_state)
    meta = TenantKeys("acme").meta
    now_ms = int(any_state.client.time()[0]) * 1000
    any_state.client.hset(
        meta, mapping={"ctl_concurrency": 1, "ctl_concurrency_until": now_ms + 60_000}
    )
    limits = AdmissionLimits(concurrency=5)
    statuses = [
        admitter.admit(
            ctx=ctx(), action=tool(), task_id=f"o{i}", attempt=0, estimate=TOOL_STEP,
            limits=limits, envelope=envelope(f"o{i}"),
        ).status
        for i in range(2)
    ]  # fmt: skip
    assert statuses == [AdmissionStatus.ADMITTED, AdmissionStatus.WAITING]
    any_state.client.hset(meta, "ctl_concurrency_until", now_ms - 1)  # it ended
    later = admitter.admit(
        ctx=ctx(), action=tool(), task_id="o9", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    # The policy's 5 again: the waiting task is handed on first, then this one runs too.
    assert [p.task_id for p in later.publish] == ["o1"]
    assert later.status is AdmissionStatus.ADMITTED


def test_pool_and_tenant_keys_never_share_a_slot() -> None:
    """On a cluster the pool's script touches only the pool's slot; each tenant's its own."""
    pool_tags = {k.split("}")[0] for k in PoolKeys(QUEUE).all()}
    assert pool_tags == {"gov:{pool:q-fair"}
    assert not any(k.startswith("gov:{acme}") for k in PoolKeys(QUEUE).all())


@pytest.mark.parametrize("tenants", [10, 10_000])
def test_one_dispatch_is_the_same_few_commands_whatever_the_number_of_waiting_tenants(
    state: StateStore, tenants: int
) -> None:
    pool = pools(state, capacity={QUEUE: 4})
    register = [(f"t{i}", 1.0) for i in range(tenants)]
    for start in range(0, tenants, 1000):
        pool.dispatch(QUEUE, register=register[start : start + 1000], saturate=True, give=False)
    info = state.client.info("commandstats")
    before = sum(int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_"))
    grant = pool.dispatch(QUEUE)
    after = sum(
        int(v["calls"])
        for k, v in state.client.info("commandstats").items()
        if k.startswith("cmdstat_")
    )
    assert grant.tenant is not None
    # The script's own commands, plus EVALSHA and INFO: independent of the tenants waiting.
    assert after - before < 40, after - before


def test_a_backlogged_broker_keeps_the_pool_saturated_for_a_while(any_state: StateStore) -> None:
    """A delivery that found the broker backlogged saturates the pool before anything waits
    for it (publishers then keep tasks out of the broker), for a couple of seconds."""
    pool = pools(any_state, capacity={QUEUE: 4})
    assert not pool.dispatch(QUEUE, give=False).saturated
    assert pool.dispatch(QUEUE, saturate=True, give=False).saturated
    assert pool.dispatch(QUEUE, give=True).saturated  # nothing waits, but the backlog holds
    assert pool.saturated([QUEUE]) == {QUEUE: True}


def test_at_publication_tasks_already_in_the_broker_hold_their_slots(
    any_state: StateStore,
) -> None:
    """First come, first served: a task published while an earlier one of its tenant is still in
    the broker (not received yet) waits from publication when they would exceed its concurrency,
    instead of taking the slot before the earlier one arrives."""
    admitter, ledger = Admitter(any_state), Ledger(any_state)
    limits = AdmissionLimits(concurrency=1)
    assert not ledger.record_published("acme", "first", envelope("first")).must_wait(1)
    load = ledger.record_published("acme", "second", envelope("second"))
    assert load.must_wait(1)
    second = admitter.admit(
        ctx=ctx(), action=tool(), task_id="second", attempt=0, estimate=TOOL_STEP,
        limits=limits, at_publish=True,
    )  # fmt: skip
    assert second.status is AdmissionStatus.WAITING
    first = admitter.admit(
        ctx=ctx(), action=tool(), task_id="first", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert first.admitted
    (handed,) = admitter.settle(first.ticket, TOOL_STEP).publish
    assert handed.task_id == "second"
