"""Limits hold exactly under contention: many processes, exact counts, real Redis."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from governance.embedded import EmbeddedRedis
from governance.policy.limits import ViolationType
from governance.policy.usage import Usage
from governance.store import (
    Admission,
    AdmissionLimits,
    AdmissionStatus,
    Admitter,
    BudgetCheck,
    Period,
    Rate,
    StateStore,
    StoreUnavailable,
    connect,
    read_usage,
    set_cooldown,
)
from tests.store.helpers import TOOL_STEP, ctx, llm, tokens, tool

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


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


def _contend(url: str, worker: int, rounds: int, concurrency: int) -> None:
    client = redis.Redis.from_url(url)
    state = StateStore(client, lease_ms=10_000, retry_hint_ms=2)
    admitter = Admitter(state)
    observe = client.register_script(OBSERVE)
    rng = random.Random(worker)
    limits = AdmissionLimits(concurrency=concurrency)
    for i in range(rounds):
        task = f"w{worker}-{i}"
        while True:
            admission = admitter.admit(
                ctx=ctx(), action=tool(), task_id=task, attempt=0, estimate=TOOL_STEP, limits=limits
            )
            if admission.admitted:
                break
            assert admission.status is AdmissionStatus.DEFERRED
            time.sleep(min(admission.wait_ms, 2) / 1000)
        observe(keys=["obs:running", "obs:max"])
        time.sleep(rng.uniform(0, 0.002))
        client.decr("obs:running")
        admitter.settle(admission.ticket, TOOL_STEP)
        client.incr("obs:done")
    client.close()


@pytest.mark.timeout(300)
def test_zero_over_admission_8_processes_x_500(redis_url: str, redis_client: redis.Redis) -> None:
    processes, rounds, concurrency = 8, 500, 3
    workers = [
        SPAWN.Process(target=_contend, args=(redis_url, w, rounds, concurrency))
        for w in range(processes)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=280)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    assert int(redis_client.get("obs:done") or 0) == processes * rounds
    observed_max = int(redis_client.get("obs:max") or 0)
    # Never more than the limit at once, and the limit was actually reached (real contention).
    assert observed_max == concurrency
    state = StateStore(redis_client)
    assert read_usage(state, "acme", Period.RUN, run="run-1").used.steps == processes * rounds


def _admit_llm(admitter: Admitter, task: str, reserve: int, limits: AdmissionLimits) -> Admission:
    return admitter.admit(
        ctx=ctx(), action=llm(), task_id=task, attempt=0, estimate=tokens(reserve), limits=limits
    )


def test_zero_budget_overrun_with_50_concurrent_admissions(state: StateStore) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits(budget_checks=(BudgetCheck(Period.DAY, "tokens", 1_000),))
    with ThreadPoolExecutor(max_workers=50) as pool:
        first = list(pool.map(lambda i: _admit_llm(admitter, f"a{i}", 100, limits), range(50)))
    admitted = [a for a in first if a.admitted]
    assert len(admitted) == 10
    assert {a.status for a in first if not a.admitted} == {AdmissionStatus.DEFERRED}

    for admission in admitted:
        assert admitter.settle(admission.ticket, tokens(60)).settled
    assert read_usage(state, "acme", Period.DAY).used.output_tokens == 600

    # 400 tokens are left. The "6 more fit" holds for calls that reserve 60 tokens
    # (6 x 60 = 360 <= 400 < 7 x 60); calls that reserve 100 fit 4 times (4 x 100 = 400).
    with ThreadPoolExecutor(max_workers=40) as pool:
        small = list(pool.map(lambda i: _admit_llm(admitter, f"s{i}", 60, limits), range(40)))
    assert sum(a.admitted for a in small) == 6
    for admission in small:
        if admission.admitted:
            admitter.settle(admission.ticket, tokens(60))
    assert read_usage(state, "acme", Period.DAY).used.output_tokens == 960
    last = _admit_llm(admitter, "last", 60, limits)
    assert last.status is AdmissionStatus.REJECTED


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
        for i in range(40):
            reserve = rng.randint(1, 120)
            admission = _admit_llm(admitter, f"r{n}-{i}", reserve, limits)
            if admission.admitted:
                actual = rng.randint(0, reserve)
                admitter.settle(admission.ticket, tokens(actual))
                spent += actual
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
    assert blocked.status is AdmissionStatus.DEFERRED  # the dead task still holds its lease
    assert read_usage(state, "acme", Period.DAY).reserved.output_tokens == 500

    results: list[Admission] = []

    def slot_reused() -> bool:
        results.append(_admit_llm(admitter, "next", 600, limits))
        return results[-1].admitted

    wait_until(slot_reused, timeout_s=5, what="the dead task's lease to expire")
    day = read_usage(state, "acme", Period.DAY)
    assert day.active_leases == 1
    assert day.reserved.output_tokens == 600  # the dead task's 500 were given back


def test_rate_limit_admits_exactly_the_burst(state: StateStore) -> None:
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
    admitted = sum(r.admitted for r in results)
    # GCRA lets the burst through at once, then one per 100 ms: exactly 10 unless the loop
    # itself took longer than 100 ms (then one more per 100 ms elapsed, never more).
    assert 10 <= admitted <= 10 + int(elapsed_ms // 100)
    deferred = [r for r in results if not r.admitted]
    assert all(r.violation and r.violation.type is ViolationType.rate_limit for r in deferred)
    assert all(0 < r.wait_ms <= 100 for r in deferred)

    # After the wait the store asked for, exactly one more call fits.
    time.sleep(max(r.wait_ms for r in deferred[-1:]) / 1000 + 0.005)
    after = [
        admitter.admit(
            ctx=ctx(), action=tool(), task_id=f"c{i}", attempt=0, estimate=TOOL_STEP, limits=limits
        )
        for i in range(2)
    ]
    assert [a.admitted for a in after] == [True, False]


def test_provider_rate_limit_is_separate_from_other_providers(state: StateStore) -> None:
    admitter = Admitter(state)
    limits = AdmissionLimits(provider_rate=Rate(interval_ms=1000, burst=2, rate=1, per_s=1))
    openai = [_admit_llm_to(admitter, "openai", f"o{i}", limits) for i in range(3)]
    fake = [_admit_llm_to(admitter, "fake", f"f{i}", limits) for i in range(2)]
    assert [a.admitted for a in openai] == [True, True, False]
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
    assert cooling.status is AdmissionStatus.DEFERRED
    assert cooling.violation is not None
    assert cooling.violation.type is ViolationType.cooldown
    assert 0 < cooling.wait_ms <= 2_000
    assert _admit_llm_to(admitter, "fake", "q1", limits).admitted
    assert _admit_llm_to(admitter, "openai", "other-tenant", limits).status is (
        AdmissionStatus.DEFERRED
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
