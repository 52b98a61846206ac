"""Limits hold exactly under contention: many processes, exact counts, real Redis."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import redis

from governance.embedded import EmbeddedRedis
from governance.policy.config import RateLimit
from governance.policy.limits import ViolationType
from governance.policy.usage import Usage
from governance.store import Period, StateStore, StoreUnavailable, connect, read_usage
from governance.store.admission import Admission, AdmissionStatus, Admitter, Publication
from governance.store.cooldown import set_cooldown
from governance.store.keys import TenantKeys
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate
from governance.store.vocabulary import ADMISSION
from tests.polling import wait_until
from tests.store.helpers import TOOL_STEP, ctx, envelope, llm, tokens, tool

# Spawn, not fork: other tests leave threads in this process (Celery's result consumer, HTTP
# servers), and a child forked while one of them holds a lock deadlocks.
SPAWN = multiprocessing.get_context("spawn")

# Counts tasks between "admitted" and "about to settle", and keeps the highest count seen:
# an observation independent of the lease set that admission itself uses.
OBSERVE = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def _consume(url: str, worker: int, total: int, concurrency: int) -> None:
    """One worker process: takes task messages off a shared list (a broker's queue), admits
    them, runs the admitted ones, and publishes what admission and settlement hand on."""
    client = redis.Redis.from_url(url)
    state = StateStore(client, lease_ms=10_000)
    admitter = Admitter(state)
    observe = client.register_script(OBSERVE)
    rng = random.Random(worker)
    limits = AdmissionLimits(concurrency=concurrency)
    deliveries = 0

    def publish(publications: tuple[Publication, ...]) -> None:
        for p in publications:
            client.lpush("broker", json.dumps([p.task_id, p.handoff]))

    while int(client.get("obs:done") or 0) < total:
        item = client.brpop(["broker"], timeout=0.2)
        if item is None:
            continue
        task, token = json.loads(item[1])
        deliveries += 1
        client.incr("obs:admissions")
        admission = admitter.admit(
            ctx=ctx(),
            action=tool(),
            task_id=task,
            attempt=0,
            estimate=TOOL_STEP,
            limits=limits,
            handoff=token,
            holder=f"{worker}-{deliveries}",
            envelope=envelope(task),
        )
        publish(admission.publish)
        if not admission.admitted:
            assert admission.status in (AdmissionStatus.WAITING, AdmissionStatus.DUPLICATE)
            continue
        observe(keys=["obs:running", "obs:max"])
        time.sleep(rng.uniform(0, 0.002))
        client.decr("obs:running")
        settlement = admitter.settle(admission.ticket, TOOL_STEP)
        assert settlement.settled
        client.sadd("obs:ran", task)
        client.incr("obs:done")
        publish(settlement.publish)
    client.close()


@pytest.mark.timeout(300)
def test_zero_over_admission_8_processes_x_500(redis_url: str, redis_client: redis.Redis) -> None:
    """4,000 tasks through 8 contending processes at a concurrency of 3: an independent observer
    never sees more than 3 running; every task runs exactly once; none polls (at most two
    admissions per task: its arrival, and its hand-off)."""
    processes, total, concurrency = 8, 4000, 3
    redis_client.lpush("broker", *[json.dumps([f"t{i}", None]) for i in range(total)][::-1])
    workers = [
        SPAWN.Process(target=_consume, args=(redis_url, w, total, concurrency))
        for w in range(processes)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=280)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    assert int(redis_client.get("obs:done") or 0) == total
    assert redis_client.scard("obs:ran") == total
    observed_max = int(redis_client.get("obs:max") or 0)
    # Never more than the limit at once, and the limit was actually reached (real contention).
    assert observed_max == concurrency
    assert int(redis_client.get("obs:admissions") or 0) <= 2 * total
    state = StateStore(redis_client)
    assert read_usage(state, "acme", Period.RUN, run="run-1").used.steps == total
    assert read_usage(state, "acme", Period.DAY).active_leases == 0


def _admit_llm(
    admitter: Admitter,
    task: str,
    reserve: int,
    limits: AdmissionLimits,
    handoff: str | None = None,
) -> Admission:
    return admitter.admit(
        ctx=ctx(),
        action=llm(),
        task_id=task,
        attempt=0,
        estimate=tokens(reserve),
        limits=limits,
        handoff=handoff,
        envelope=envelope(task),
    )


def test_zero_budget_overrun_with_50_concurrent_admissions(state: StateStore) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),))
    with ThreadPoolExecutor(max_workers=50) as pool:
        first = list(pool.map(lambda i: _admit_llm(admitter, f"a{i}", 100, limits), range(50)))
    admitted = [a for a in first if a.admitted]
    assert len(admitted) == 10
    # Over only because of what the ten in flight reserved: they wait for it.
    assert {a.status for a in first if not a.admitted} == {AdmissionStatus.WAITING}

    wait_order = [
        m.decode().rsplit(":", 1)[1] for m in state.client.zrange(TenantKeys("acme").waiting, 0, -1)
    ]
    handed: list[Publication] = []
    for admission in admitted:
        settlement = admitter.settle(admission.ticket, tokens(60))
        assert settlement.settled
        handed += settlement.publish
    # 400 tokens are left: exactly four waiting calls of 100 are handed on, in order.
    assert [p.task_id for p in handed] == wait_order[:4]
    day = read_usage(state, "acme", Period.DAY)
    assert (day.used.output_tokens, day.reserved.output_tokens) == (600, 400)

    ended: list[Publication] = []
    for publication in handed:
        admission = _admit_llm(admitter, publication.task_id, 100, limits, publication.handoff)
        assert admission.admitted
        ended += admitter.settle(admission.ticket, tokens(100)).publish
    # The budget is spent: every other waiting call is published without a token, so that its
    # own delivery ends it with the reason.
    assert len(ended) == 36
    assert all(p.handoff is None for p in ended)
    for publication in ended:
        rejected = _admit_llm(admitter, publication.task_id, 100, limits)
        assert rejected.status is AdmissionStatus.REJECTED
        assert rejected.reason.startswith("token_limit exceeded: 1100 / 1000")
    assert read_usage(state, "acme", Period.DAY).used.output_tokens == 1_000


def test_no_interleaving_of_admissions_and_settlements_records_over_the_budget(
    state: StateStore,
) -> None:
    limit = 1_000
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "tokens", limit),))
    stop = threading.Event()
    seen: list[int] = []

    def monitor() -> None:
        while not stop.is_set():
            snapshot = read_usage(state, "acme", Period.DAY)
            seen.append(snapshot.used.output_tokens + snapshot.reserved.output_tokens)

    def agent(n: int) -> int:
        rng = random.Random(n)
        admitter = Admitter(state)
        spent = 0
        inbox: list[tuple[str, str | None, int]] = []
        for i in range(40):
            inbox.append((f"r{n}-{i}", None, rng.randint(1, 120)))
            while inbox:
                task, token, reserve = inbox.pop(0)
                admission = _admit_llm(admitter, task, reserve, limits, token)
                if not admission.admitted:
                    continue
                actual = rng.randint(0, reserve)
                settlement = admitter.settle(admission.ticket, tokens(actual))
                spent += actual
                # This agent runs what its settlement handed on (its reservation is the one
                # recorded at the time it began to wait).
                for p in settlement.publish:
                    inbox.append((p.task_id, p.handoff, _reserved(state, p.task_id)))
        return spent

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            spent = sum(pool.map(agent, range(8)))
    finally:
        stop.set()
        watcher.join()
    final = read_usage(state, "acme", Period.DAY)
    assert final.used.output_tokens == spent
    assert spent <= limit
    assert seen
    assert max(seen) <= limit


def _reserved(state: StateStore, task: str) -> int:
    raw = state.client.hget(f"gov:{{acme}}:task:{task}", "req")
    # The request a waiting task keeps: admit.lua's arguments, by the positions they have there.
    return int(json.loads(raw)["args"][ADMISSION["est_output_tokens"] - 1]) if raw else 1


def _hold_lease_forever(url: str, ready: Any) -> None:
    client = redis.Redis.from_url(url)
    state = StateStore(client, lease_ms=1_000)
    admission = Admitter(state).admit(
        ctx=ctx(),
        action=llm(),
        task_id="doomed",
        attempt=0,
        estimate=tokens(500),
        limits=AdmissionLimits(
            concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),)
        ),
    )
    assert admission.admitted
    ready.set()
    time.sleep(600)


def test_a_killed_holder_frees_its_slot_and_reservation_within_one_lease(
    redis_url: str, state: StateStore
) -> None:
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lease_forever, args=(redis_url, ready))
    holder.start()
    assert ready.wait(10), "the lease holder never admitted its task"
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)

    admitter = Admitter(state)
    limits = AdmissionLimits(
        concurrency=1, budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),)
    )
    blocked = _admit_llm(admitter, "next", 600, limits)
    assert blocked.status is AdmissionStatus.WAITING  # the dead task still holds its lease
    assert read_usage(state, "acme", Period.DAY).reserved.output_tokens == 500

    ledger = Ledger(state)
    handed: list[Publication] = []

    def slot_handed_on() -> bool:
        handed.extend(p for p in ledger.sweep("acme").publish if p.handoff)
        return bool(handed)

    started = time.monotonic()
    wait_until(slot_handed_on, timeout_s=5, what="the dead task's lease to expire")
    assert time.monotonic() - started < 1.5  # within one lease (1 s) and a sweep
    admitted = _admit_llm(admitter, "next", 600, limits, handed[0].handoff)
    assert admitted.admitted
    day = read_usage(state, "acme", Period.DAY)
    assert day.active_leases == 1
    assert day.reserved.output_tokens == 600  # the dead task's 500 were given back


def test_rate_limit_admits_the_burst_and_books_the_rest_one_interval_apart(
    state: StateStore,
) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits(tenant_rate=Rate(interval_ms=100, burst=10, rate=10, per_s=1))
    started = time.monotonic()
    results = [
        admitter.admit(
            ctx=ctx(), action=tool(), task_id=f"b{i}", attempt=0, estimate=TOOL_STEP, limits=limits
        )
        for i in range(100)
    ]
    elapsed_ms = (time.monotonic() - started) * 1000
    admitted = [r for r in results if r.admitted]
    booked = [r for r in results if r.status is AdmissionStatus.BOOKED]
    # GCRA lets the burst through at once; every later call books the next free turn (one
    # more is admitted at once per 100 ms the loop itself took).
    assert 10 <= len(admitted) <= 10 + int(elapsed_ms // 100)
    assert len(admitted) + len(booked) == 100
    assert all(r.violation and r.violation.type is ViolationType.rate_limit for r in booked)
    turns = [r.turn_ms for r in booked]
    assert all(b - a == 100 for a, b in itertools.pairwise(turns))

    # A new call books the turn after the last one: the rate holds however many wait.
    later = admitter.admit(
        ctx=ctx(), action=tool(), task_id="late", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert later.status is AdmissionStatus.BOOKED
    assert later.turn_ms == turns[-1] + 100


def test_provider_rate_limit_is_separate_from_other_providers(state: StateStore) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits(provider_rate=Rate(interval_ms=1000, burst=2, rate=1, per_s=1))
    openai = [_admit_llm_to(admitter, "openai", f"o{i}", limits) for i in range(3)]
    fake = [_admit_llm_to(admitter, "fake", f"f{i}", limits) for i in range(2)]
    assert [a.status for a in openai] == [
        AdmissionStatus.ADMITTED,
        AdmissionStatus.ADMITTED,
        AdmissionStatus.BOOKED,
    ]
    assert all(a.admitted for a in fake)


def _admit_llm_to(
    admitter: Admitter, provider: str, task: str, limits: AdmissionLimits
) -> Admission:
    return admitter.admit(
        ctx=ctx(),
        action=llm(provider=provider),
        task_id=task,
        attempt=0,
        estimate=tokens(1),
        limits=limits,
    )


def test_shared_cooldown_defers_one_provider_until_it_passes(state: StateStore) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits()
    set_cooldown(state, "acme", "openai", 2_000)
    cooling = _admit_llm_to(admitter, "openai", "p1", limits)
    assert cooling.status is AdmissionStatus.BOOKED
    assert cooling.violation is not None
    assert cooling.violation.type is ViolationType.cooldown
    assert 0 < cooling.wait_ms <= 2_000
    assert _admit_llm_to(admitter, "fake", "q1", limits).admitted
    assert _admit_llm_to(admitter, "openai", "other-tenant", limits).status is (
        AdmissionStatus.BOOKED
    )
    # A shorter Retry-After never shortens the recorded cooldown.
    assert set_cooldown(state, "acme", "openai", 10) > int(time.time() * 1000) + 1_000
    wait_until(
        lambda: _admit_llm_to(admitter, "openai", "p1", limits).admitted,
        timeout_s=5,
        what="the cooldown to pass",
    )


@pytest.mark.timeout(30)
def test_fail_closed_when_redis_is_stopped(redis_server: EmbeddedRedis) -> None:
    state = StateStore(connect(redis_server.url, timeout_s=1.0))
    admitter = Admitter(state)
    assert admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="before",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
    ).admitted
    redis_server.stop()
    with pytest.raises(StoreUnavailable, match="admission"):
        admitter.admit(
            ctx=ctx(),
            action=tool(),
            task_id="during",
            attempt=0,
            estimate=TOOL_STEP,
            limits=AdmissionLimits(),
        )
    state.close()


@pytest.mark.timeout(30)
def test_fail_closed_without_hanging_when_redis_stops_answering(
    redis_server: EmbeddedRedis,
) -> None:
    state = StateStore(connect(redis_server.url, timeout_s=0.5), lease_ms=500)
    admitter = Admitter(state)
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable):
            admitter.admit(
                ctx=ctx(),
                action=tool(),
                task_id="frozen",
                attempt=0,
                estimate=TOOL_STEP,
                limits=AdmissionLimits(),
            )
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    # The server may still execute the request it had buffered once it resumes; the caller was
    # told "unavailable" and ran nothing, and the orphaned lease expires within one lease period.
    assert read_usage(state, "acme", Period.DAY).used == Usage()
    wait_until(
        lambda: read_usage(state, "acme", Period.DAY).active_leases == 0,
        timeout_s=5,
        what="an orphaned lease to expire",
    )
    state.close()


# -- providers shared by the deployment (scope: deployment) ------------------------------------


SHARED = AdmissionLimits(shared_provider=True)


def _admit_shared(admitter: Admitter, tenant: str, task: str, limits: AdmissionLimits) -> Admission:
    return admitter.admit(
        ctx=ctx(tenant=tenant),
        action=llm(provider="openai"),
        task_id=task,
        attempt=0,
        estimate=tokens(1),
        limits=limits,
        envelope=envelope(task),
    )


def test_one_tenants_429_pauses_every_tenant_of_a_shared_provider(any_state: StateStore) -> None:
    """Tenant A's Retry-After on a deployment-scoped provider books tenant B's next call for
    when it passes; a provider scoped per tenant (the default) keeps its own cooldown. On a
    single Redis and on a cluster (the provider's keys are in a slot of their own)."""
    admitter = Admitter(any_state)
    deadline = set_cooldown(any_state, "tenant-a", "openai", 2_000, shared=True)
    b = _admit_shared(admitter, "tenant-b", "b1", SHARED)
    assert b.status is AdmissionStatus.BOOKED
    assert b.violation is not None
    assert b.violation.type is ViolationType.cooldown
    assert 0 < b.wait_ms <= 2_000
    assert b.turn_ms == deadline
    # The same provider, scoped per tenant: tenant B has no cooldown of its own.
    assert _admit_shared(admitter, "tenant-b", "b2", AdmissionLimits()).admitted
    wait_until(
        lambda: _admit_shared(admitter, "tenant-b", "b1", SHARED).admitted,
        timeout_s=5,
        what="the shared cooldown to pass",
    )


def _admit_shared_in_process(url: str, worker: int, calls: int, out: Any) -> None:
    state = StateStore(redis.Redis.from_url(url))
    admitter = Admitter(state)
    limits = AdmissionLimits(
        shared_provider=True,
        shared_provider_rate=Rate.of(RateLimit(rate=5, per=timedelta(seconds=60))),
    )
    admitted = 0
    for i in range(calls):
        tenant = f"tenant-{(worker + i) % 4}"
        if _admit_shared(admitter, tenant, f"w{worker}-{i}", limits).admitted:
            admitted += 1
    out.put(admitted)


@pytest.mark.timeout(120)
def test_a_shared_provider_rate_is_exact_across_tenants_and_processes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """8 processes, 4 tenants, 80 calls at once against a provider-wide 5 per minute (burst 5):
    exactly 5 are admitted, all the others booked for later."""
    out = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_admit_shared_in_process, args=(redis_url, w, 10, out))
        for w in range(8)
    ]
    for p in workers:
        p.start()
    admitted = sum(out.get(timeout=100) for _ in workers)
    for p in workers:
        p.join(timeout=20)
        assert p.exitcode == 0
    assert admitted == 5
