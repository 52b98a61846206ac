"""Micro-benchmark of the store: admission + settlement from one client against a real Redis.

Prints the governed-task rate one client sustains, admission+settlement latency p50/p99, and
how many Redis round trips one governed task costs, counted on the client (every request the
connection writes) and cross-checked with the server's count of script calls (``INFO
commandstats``). Also admission p50 with 10 vs 10,000 active tenants.

The state store's own cost: the Redis CPU (``INFO cpu``, the server's user + system time) of one
governed task as a deployment makes it, one client on a quiet server: the publisher's ledger
record, the admission and the settlement, their audit entries sealed (the seals ride on the next
calls, as in a worker), and how many such tasks one Redis core can serve: the median of three
runs. Then the maintenance leader's steady-state cost per governed task: its audit adoption
reads every entry once, and keeps the unsealed ones until their seal comes.

Fair dispatch: the dispatch a worker makes when a task of a saturated pool settles, with 10 and
with 10,000 tenants waiting for the pool (each with tasks in its wait list, admitted at
publication as a publisher does): the pool's call (``Pools.dispatch``: the grant that ended, and
who is given the freed capacity) and the given tenant's call (``Ledger.dispatch``: its oldest
waiting task handed on with the grant), p50/p99 of each and of both, and the script calls and
round trips per dispatch (the server's count).

Run: ``make bench`` (or ``python -m governance.bench.store_bench [--tasks N] [--json FILE]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from governance.embedded import EmbeddedRedis
from governance.integration.audit_fields import audit_template
from governance.policy.actions import LLMCall, Message
from governance.policy.context import ActionContext
from governance.policy.fairness import FairShare
from governance.policy.long_running import PRESETS
from governance.policy.usage import Usage
from governance.store import Period, StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.audit import AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.audit_verify import AdoptionCursor, adopt
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate
from governance.store.pool import Completion, Pools

LIMITS = AdmissionLimits(
    concurrency=1_000,
    tenant_rate=Rate(interval_ms=0.01, burst=1_000_000, rate=100_000, per_s=1),
    provider_rate=Rate(interval_ms=0.01, burst=1_000_000, rate=100_000, per_s=1),
    budget_checks=(
        BudgetCheck(Period.DAY, "tokens", 10**12),
        BudgetCheck(Period.MONTH, "cost", 10**12),
        BudgetCheck(Period.RUN, "steps", 10**9),
    ),
    long_running=PRESETS["unlimited"],
)
#: The audit key of the benchmark's seals.
AUDIT_KEY = b"bench-audit-key"
#: The policy version the benchmark's audit entries name (a worker's is its policy's digest).
POLICY_VERSION = "1-3f9a2c41d07b"
ESTIMATE = Usage(steps=1, input_tokens=20, output_tokens=100, cost_micro_usd=170)
ACTUAL = Usage(steps=1, input_tokens=20, output_tokens=60, cost_micro_usd=110)
CALL = LLMCall(
    provider="fake",
    model="fake-small",
    messages=[Message(role="user", content="benchmark")],
    max_tokens=100,
)


class CountingConnection(redis.Connection):
    """A connection that counts the requests it writes: one per network round trip."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@contextmanager
def _redis_url() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _script_calls(state: StateStore) -> int:
    stats = state.client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def admit_and_settle(admitter: Admitter, ctx: ActionContext, task_id: str) -> None:
    """One governed task's admission and settlement (the benchmark's LLM call), with the audit
    template a worker sends (who, which run, which task and action, the policy and the tier)."""
    admission = admitter.admit(
        ctx=ctx,
        action=CALL,
        task_id=task_id,
        attempt=0,
        estimate=ESTIMATE,
        limits=LIMITS,
        template=audit_template(ctx, task_id, CALL, POLICY_VERSION, "act_auto"),
    )
    if not admission.admitted:
        raise RuntimeError(f"benchmark task was not admitted: {admission.violation}")
    admitter.settle(admission.ticket, ACTUAL)


def measure_round_trip(state: StateStore, tasks: int) -> dict[str, Any]:
    """Admit and settle ``tasks`` governed tasks one after another."""
    admitter = Admitter(state)
    ctx = ActionContext(tenant="bench", agent="agent", run="run-bench")
    latencies: list[float] = []
    scripts_before = _script_calls(state)
    sent_before = CountingConnection.sent
    started = time.perf_counter()
    for i in range(tasks):
        t0 = time.perf_counter()
        admit_and_settle(admitter, ctx, f"t{i}")
        latencies.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    round_trips = CountingConnection.sent - sent_before
    script_calls = _script_calls(state) - scripts_before
    return {
        "tasks": tasks,
        "governed_tasks_per_s": round(tasks / elapsed, 1),
        "admit_settle_p50_ms": round(_percentile(latencies, 0.50), 3),
        "admit_settle_p99_ms": round(_percentile(latencies, 0.99), 3),
        "redis_round_trips_per_task": round(round_trips / tasks, 3),
        "script_calls_per_task_server_side": round(script_calls / tasks, 3),
    }


def _redis_cpu_s(state: StateStore) -> float:
    info = state.client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measure_redis_cpu(state: StateStore, tasks: int, repeats: int = 3) -> dict[str, Any]:
    """The state Redis's own CPU per governed task: ledger record, admission and settlement,
    sealed (one client, one tenant, one after another); the median of ``repeats`` runs of
    ``tasks`` tasks each (a shared machine moves a single run by 10% or more). Then what the
    maintenance leader spends reading those tasks' audit entries (:func:`measure_leader`)."""
    sealer = AuditSealer(AUDIT_KEY)
    admitter, ledger = Admitter(state, sealer), Ledger(state, sealer)
    ctx = ActionContext(tenant="bench", agent="agent", run="run-bench")
    runs: list[float] = []
    for repeat in range(repeats):
        before = _redis_cpu_s(state)
        for i in range(tasks):
            task_id = f"c{repeat}-{i}"
            ledger.record_published("bench", task_id, _envelope(task_id))
            admit_and_settle(admitter, ctx, task_id)
        runs.append((_redis_cpu_s(state) - before) / tasks * 1_000_000)
    used_us = statistics.median(runs)
    return {
        "redis_cpu_us_per_governed_task": round(used_us, 1),
        "redis_cpu_us_per_governed_task_runs": [round(run, 1) for run in runs],
        "governed_tasks_per_s_per_redis_core": round(1_000_000 / used_us) if used_us else None,
        **measure_leader(state, "bench", tasks * repeats),
    }


def measure_leader(state: StateStore, chain: str, tasks: int) -> dict[str, Any]:
    """The maintenance leader's steady-state cost per governed task: its audit adoption reads
    each entry of a chain once (a cursor between rounds), keeping the unsealed ones until their
    seal comes or their grace ends. Measured as one round over the ``tasks`` tasks' entries
    (their seals included): this process's CPU and the Redis's, per task."""
    log_ = AuditLog(state, AuditSealer(AUDIT_KEY))
    cursor = AdoptionCursor()
    redis_before, cpu_before = _redis_cpu_s(state), time.process_time()
    adopt(log_, AUDIT_KEY, chain, grace_ms=60_000, cursor=cursor)
    python_us = (time.process_time() - cpu_before) / tasks * 1_000_000
    redis_us = (_redis_cpu_s(state) - redis_before) / tasks * 1_000_000
    return {
        "leader_cpu_us_per_governed_task": round(python_us, 1),
        "leader_redis_cpu_us_per_governed_task": round(redis_us, 1),
    }


def measure_tenant_scale(state: StateStore, tenants: int, samples: int) -> float:
    """Admission p50 (ms) when ``tenants`` tenants each have live state in Redis."""
    admitter = Admitter(state)
    contexts = [
        ActionContext(tenant=f"tenant-{n}", agent="agent", run="run-1") for n in range(tenants)
    ]
    pipe_size = 500
    for start in range(0, tenants, pipe_size):  # give every tenant usage, a window and a lease
        for ctx in contexts[start : start + pipe_size]:
            admitter.admit(
                ctx=ctx, action=CALL, task_id="warm", attempt=0, estimate=ESTIMATE, limits=LIMITS
            )
    latencies: list[float] = []
    for i in range(samples):
        ctx = contexts[i % tenants]
        t0 = time.perf_counter()
        admitter.admit(
            ctx=ctx, action=CALL, task_id=f"s{i}", attempt=0, estimate=ESTIMATE, limits=LIMITS
        )
        latencies.append((time.perf_counter() - t0) * 1000)
    return statistics.median(latencies)


#: The queue of the dispatch benchmark and its pool's capacity (a policy's fixed one).
POOL_QUEUE, POOL_CAPACITY = "bench-pool", 4
#: What a dispatched task is charged when it ends (its worker time, ms).
RUN_MS = 500.0


def _envelope(task_id: str) -> str:
    return json.dumps(
        {"task": "bench.llm", "args": [], "kwargs": {}, "options": {"task_id": task_id}}
    )


def wait_for_pool(state: StateStore, tenants: int, per_tenant: int) -> None:
    """``per_tenant`` tasks of each of ``tenants`` tenants wait for the saturated pool, recorded
    and admitted at publication as a publisher does, and the tenants registered with the pool."""
    admitter, ledger = Admitter(state), Ledger(state)
    for n in range(tenants):
        ctx = ActionContext(tenant=f"tenant-{n}", agent="agent", run="run-1")
        for i in range(per_tenant):
            task_id = f"w{n}-{i}"
            ledger.record_published(ctx.tenant, task_id, _envelope(task_id))
            admission = admitter.admit(
                ctx=ctx, action=CALL, task_id=task_id, attempt=0, estimate=ESTIMATE,
                limits=LIMITS, at_publish=True, pool_wait=True, queue=POOL_QUEUE,
            )  # fmt: skip
            if admission.status is not AdmissionStatus.WAITING:
                raise RuntimeError(f"a task did not wait for the pool: {admission.status}")
    pools = Pools(state, FairShare(capacity={POOL_QUEUE: POOL_CAPACITY}))
    names = [(f"tenant-{n}", 1.0) for n in range(tenants)]
    for start in range(0, tenants, 1000):
        pools.dispatch(POOL_QUEUE, register=names[start : start + 1000], saturate=True, give=False)


def measure_dispatch(state: StateStore, tenants: int, samples: int) -> dict[str, Any]:
    """``samples`` dispatches of a saturated pool with ``tenants`` tenants waiting: each one a
    worker's, after a dispatched task settled (its grant ends, charged its run time), the pool
    call, then the given tenant's call handing its oldest waiting task on."""
    wait_for_pool(state, tenants, per_tenant=max(1, math.ceil(samples / tenants)) + 1)
    pools = Pools(state, FairShare(capacity={POOL_QUEUE: POOL_CAPACITY}))
    ledger = Ledger(state)
    in_flight: list[tuple[str, str]] = []
    pool_ms: list[float] = []
    tenant_ms: list[float] = []
    both_ms: list[float] = []
    handed = 0
    scripts_before = _script_calls(state)
    sent_before = CountingConnection.sent
    for _ in range(samples):
        completed = None
        if len(in_flight) >= POOL_CAPACITY:
            tenant, grant_token = in_flight.pop(0)
            completed = Completion(tenant, RUN_MS, RUN_MS, grant_token)
        t0 = time.perf_counter()
        grant = pools.dispatch(POOL_QUEUE, completed=completed)
        t1 = time.perf_counter()
        if grant.tenant is None or not grant.grants:
            raise RuntimeError("the pool gave nothing while tenants wait")
        result = ledger.dispatch(grant.tenant, grant.grants, queue=POOL_QUEUE)
        t2 = time.perf_counter()
        if result.used != len(grant.grants):
            raise RuntimeError(f"{grant.tenant} used {result.used} of {len(grant.grants)} grants")
        handed += result.used
        in_flight += [(grant.tenant, g) for g in grant.grants]
        pool_ms.append((t1 - t0) * 1000)
        tenant_ms.append((t2 - t1) * 1000)
        both_ms.append((t2 - t0) * 1000)
    round_trips = CountingConnection.sent - sent_before
    script_calls = _script_calls(state) - scripts_before
    return {
        "tenants_waiting": tenants,
        "dispatches": samples,
        "tasks_per_dispatch": round(handed / samples, 3),
        "dispatch_p50_ms": round(_percentile(both_ms, 0.50), 3),
        "dispatch_p99_ms": round(_percentile(both_ms, 0.99), 3),
        "pool_call_p50_ms": round(_percentile(pool_ms, 0.50), 3),
        "pool_call_p99_ms": round(_percentile(pool_ms, 0.99), 3),
        "tenant_call_p50_ms": round(_percentile(tenant_ms, 0.50), 3),
        "tenant_call_p99_ms": round(_percentile(tenant_ms, 0.99), 3),
        "script_calls_per_dispatch": round(script_calls / samples, 3),
        "redis_round_trips_per_dispatch": round(round_trips / samples, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=5_000, help="governed tasks to time")
    parser.add_argument(
        "--dispatches", type=int, default=2_000, help="fair dispatches to time, per tenant count"
    )
    parser.add_argument("--json", default="bench-results-store.json", help="where to write JSON")
    args = parser.parse_args(argv)
    with _redis_url() as url:
        pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
        state = StateStore(redis.Redis(connection_pool=pool))
        state.client.flushdb()
        result = measure_round_trip(state, args.tasks)
        state.client.flushdb()
        result.update(measure_redis_cpu(state, args.tasks))
        state.client.flushdb()
        p50_small = measure_tenant_scale(state, 10, 2_000)
        state.client.flushdb()
        p50_large = measure_tenant_scale(state, 10_000, 2_000)
        dispatch = {}
        for tenants in (10, 10_000):
            state.client.flushdb()
            dispatch[tenants] = measure_dispatch(state, tenants, args.dispatches)
        state.client.flushdb()
        state.close()
    result["admission_p50_ms_10_tenants"] = round(p50_small, 3)
    result["admission_p50_ms_10000_tenants"] = round(p50_large, 3)
    result["tenant_scale_ratio"] = round(p50_large / p50_small, 3)
    print("store micro-benchmark (one client, one Redis, this machine)")
    print(f"  governed tasks (admit + settle) per second : {result['governed_tasks_per_s']}")
    print(
        f"  admit+settle latency p50 / p99            : {result['admit_settle_p50_ms']} ms / "
        f"{result['admit_settle_p99_ms']} ms"
    )
    print(
        f"  Redis round trips per governed task       : {result['redis_round_trips_per_task']} "
        f"(server saw {result['script_calls_per_task_server_side']} script calls per task)"
    )
    print(
        f"  Redis CPU per governed task (sealed)      : "
        f"{result['redis_cpu_us_per_governed_task']} us: ledger record, admission, settlement "
        f"(about {result['governed_tasks_per_s_per_redis_core']:,} governed tasks/s per Redis core;"
        f" median of {result['redis_cpu_us_per_governed_task_runs']})"
    )
    print(
        f"  maintenance leader, per governed task     : "
        f"{result['leader_cpu_us_per_governed_task']} us CPU + "
        f"{result['leader_redis_cpu_us_per_governed_task']} us Redis (its audit adoption reads "
        "each entry once)"
    )
    print(
        f"  admission p50, 10 vs 10,000 tenants       : {result['admission_p50_ms_10_tenants']} "
        f"ms vs {result['admission_p50_ms_10000_tenants']} ms "
        f"(ratio {result['tenant_scale_ratio']})"
    )
    small, large = dispatch[10], dispatch[10_000]
    result["fair_dispatch"] = {"10_tenants": small, "10000_tenants": large}
    print(
        f"  fair dispatch p50 / p99, 10 tenants       : {small['dispatch_p50_ms']} ms / "
        f"{small['dispatch_p99_ms']} ms (pool call {small['pool_call_p50_ms']} ms, tenant call "
        f"{small['tenant_call_p50_ms']} ms at p50)"
    )
    print(
        f"  fair dispatch p50 / p99, 10,000 tenants   : {large['dispatch_p50_ms']} ms / "
        f"{large['dispatch_p99_ms']} ms (pool call {large['pool_call_p50_ms']} ms, tenant call "
        f"{large['tenant_call_p50_ms']} ms at p50)"
    )
    print(
        f"  script calls per dispatch, 10 / 10,000    : {small['script_calls_per_dispatch']} / "
        f"{large['script_calls_per_dispatch']} (round trips "
        f"{small['redis_round_trips_per_dispatch']} / {large['redis_round_trips_per_dispatch']}; "
        f"{small['tasks_per_dispatch']} task per dispatch)"
    )
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"  written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
