"""Micro-benchmark of the store: admission + settlement from one client against a real Redis.

Prints the governed-task rate one client sustains, admission+settlement latency p50/p99, and
how many Redis round trips one governed task costs, counted on the client (every request the
connection writes) and cross-checked with the server's count of script calls (``INFO
commandstats``). Also admission p50 with 10 vs 10,000 active tenants.

Run: ``make bench`` (or ``python -m governance.bench.store_bench [--tasks N] [--json FILE]``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from governance.embedded import EmbeddedRedis
from governance.policy.actions import LLMCall, Message
from governance.policy.context import ActionContext
from governance.policy.long_running import PRESETS
from governance.policy.usage import Usage
from governance.store import Period, StateStore
from governance.store.admission import Admitter
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate

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
        admission = admitter.admit(
            ctx=ctx, action=CALL, task_id=f"t{i}", attempt=0, estimate=ESTIMATE, limits=LIMITS
        )
        if not admission.admitted:
            raise RuntimeError(f"benchmark task was not admitted: {admission.violation}")
        admitter.settle(admission.ticket, ACTUAL)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=5_000, help="governed tasks to time")
    parser.add_argument("--json", default="bench-results-store.json", help="where to write JSON")
    args = parser.parse_args(argv)
    with _redis_url() as url:
        pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
        state = StateStore(redis.Redis(connection_pool=pool))
        state.client.flushdb()
        result = measure_round_trip(state, args.tasks)
        state.client.flushdb()
        p50_small = measure_tenant_scale(state, 10, 2_000)
        state.client.flushdb()
        p50_large = measure_tenant_scale(state, 10_000, 2_000)
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
        f"  admission p50, 10 vs 10,000 tenants       : {result['admission_p50_ms_10_tenants']} "
        f"ms vs {result['admission_p50_ms_10000_tenants']} ms "
        f"(ratio {result['tenant_scale_ratio']})"
    )
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"  written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
