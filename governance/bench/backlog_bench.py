"""A backlog next to another tenant: what waiting costs, and whether the neighbour notices.

Tenant A (concurrency 2) enqueues a backlog of LLM calls of ``--task-ms`` each; ``--delay-s``
later tenant B (concurrency 2) enqueues 10 such calls. One ``celery worker -P prefork -c 4``
serves both, one Redis holds the broker (db 0) and the governance state (db 1). For each backlog
size, in one run, it prints: B's last call done against B alone (unloaded), A's failures, and
per task the Redis commands the server executed (inside scripts too), the broker messages
(publishes to the queue), the audit entries, and the worker's memory (RSS of all its processes).

Run: ``python -m governance.bench.backlog_bench [--backlogs 100 1000] [--task-ms 500]``
(``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import redis
import yaml
from celery import Celery
from celery.result import AsyncResult, ResultSet

from governance.bench.bench_app import LLM_TASK
from governance.bench.celery_bench import (
    BenchWorker,
    ServerCounters,
    _redis_base_url,
    bench_env,
    publisher_app,
)
from governance.integration import governance_context
from governance.policy.context import ActionContext
from governance.store.keys import TenantKeys

TENANTS = ("backlog-a", "backlog-b")
POLICY: dict[str, Any] = {
    "version": 1,
    "tools": {"echo": "compute"},
    "providers": {
        "fake": {"models": {"fake-small": {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5}}}
    },
    "defaults": {
        "tiers": {"default": "act_auto"},
        "allowed_providers": ["fake"],
        "allowed_tools": ["echo"],
        "concurrency": 2,
        "long_running": "disabled",
        "max_wait": "2h",
    },
    "tenants": {name: {} for name in TENANTS},
}
B_TASKS = 10


def _publish(app: Celery, tenant: str, run: str, count: int, task_ms: int) -> list[AsyncResult]:
    task = app.tasks[LLM_TASK]
    messages = [{"role": "user", "content": f"[[sleep {task_ms}]] work"}]
    ctx = ActionContext(tenant=tenant, agent="bench", run=run)
    with governance_context(ctx):
        return [
            task.apply_async(
                kwargs={
                    "provider": "fake",
                    "model": "fake-small",
                    "messages": messages,
                    "max_tokens": 8,
                }
            )
            for _ in range(count)
        ]


def _wait(
    app: Celery, results: list[AsyncResult], since: float, timeout_s: float
) -> tuple[float, int]:
    """Wait for every result (the result backend's pub/sub: no polling, so the benchmark adds
    no Redis work per pending task); (seconds from ``since`` (epoch) until the last one was
    done, by the results' own ``date_done``, and how many failed)."""
    ResultSet(results, app=app).join_native(timeout=timeout_s, propagate=False)
    last = max(r.date_done.replace(tzinfo=UTC).timestamp() for r in results)
    failed = sum(r.state != "SUCCESS" for r in results)
    return last - since, failed


def _rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the pool), in KiB."""
    total = 0
    for candidate in Path("/proc").iterdir():
        if not candidate.name.isdigit():
            continue
        try:
            status = (candidate / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(candidate.name) == pid or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total


def scenario(
    app: Celery,
    broker: redis.Redis,
    state: redis.Redis,
    worker: BenchWorker,
    backlog: int,
    task_ms: int,
    delay_s: float,
) -> dict[str, Any]:
    """One backlog of tenant A, then tenant B's calls; the figures of the table."""
    state.flushdb()
    before = ServerCounters.read(broker)
    started = time.time()
    a_results = _publish(app, TENANTS[0], f"a-{backlog}", backlog, task_ms)
    if backlog:
        time.sleep(max(0.0, started + delay_s - time.time()))
    b_started = time.time()
    b_results = _publish(app, TENANTS[1], f"b-{backlog}", B_TASKS, task_ms)
    b_seconds, b_failed = _wait(app, b_results, b_started, timeout_s=600)
    a_timeout = 120 + backlog * task_ms / 1000
    a_seconds, a_failed = (
        _wait(app, a_results, started, timeout_s=a_timeout) if a_results else (0.0, 0)
    )
    by_command = ServerCounters.read(broker).since(before)
    tasks = backlog + B_TASKS
    audit_entries = sum(int(state.hget(TenantKeys(t).meta, "audit_seq") or 0) for t in TENANTS)
    assert worker.process is not None
    return {
        "backlog": backlog,
        "b_last_done_s": round(b_seconds, 2),
        "a_failed": a_failed,
        "b_failed": b_failed,
        "redis_commands_per_task": round(sum(by_command.values()) / tasks, 1),
        "script_calls_per_task": round(
            (by_command.get("evalsha", 0) + by_command.get("eval", 0)) / tasks, 2
        ),
        "broker_messages_per_task": round(by_command.get("lpush", 0) / tasks, 2),
        "audit_entries_per_task": round(audit_entries / tasks, 2),
        "worker_rss_mib": round(_rss_kib(worker.process.pid) / 1024, 1),
        "a_last_done_s": round(a_seconds, 2),
    }


def report(rows: list[dict[str, Any]], task_ms: int, out: Any = sys.stdout) -> None:
    unloaded = rows[0]["b_last_done_s"]
    print(
        f"Backlog benchmark: tenant A (concurrency 2) with a backlog of {task_ms} ms LLM calls, "
        f"tenant B (concurrency 2) enqueues {B_TASKS} calls later; worker -c 4, one Redis",
        file=out,
    )
    header = (
        f"  {'A backlog':>9} | {'B last done':>16} | {'A failed':>8} | {'Redis cmds':>10} | "
        f"{'scripts':>7} | {'broker msgs':>11} | {'audit':>5} | {'worker RSS':>10}"
    )
    print(header, file=out)
    print("  " + "-" * (len(header) - 2), file=out)
    for row in rows:
        label = "B alone" if row["backlog"] == 0 else f"{row['backlog']:,}"
        ratio = row["b_last_done_s"] / unloaded if unloaded else 0
        print(
            f"  {label:>9} | {row['b_last_done_s']:>6.2f} s ({ratio:4.2f}x) | "
            f"{row['a_failed']:>8} | {row['redis_commands_per_task']:>10} | "
            f"{row['script_calls_per_task']:>7} | {row['broker_messages_per_task']:>11} | "
            f"{row['audit_entries_per_task']:>5} | {row['worker_rss_mib']:>6} MiB",
            file=out,
        )
    print(
        "  (per task: Redis commands the server executed, scripts included; broker messages "
        "published; audit entries)",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backlogs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--task-ms", type=int, default=500, help="duration of each LLM call")
    parser.add_argument("--delay-s", type=float, default=3.0, help="when tenant B starts")
    parser.add_argument("--json", default="bench-backlog.json", help="where to write JSON")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="backlog-bench-") as tmp,
        _redis_base_url() as (base_url, external),
    ):
        env = bench_env(base_url, Path(tmp))
        Path(env["GOVERNANCE_CONFIG_PATH"]).write_text(yaml.safe_dump(POLICY), encoding="utf-8")
        broker = redis.Redis.from_url(env["GOVERNANCE_BROKER_URL"])
        state = redis.Redis.from_url(env["GOVERNANCE_STATE_REDIS_URL"])
        if external:
            broker.flushdb()
        app = publisher_app(env)
        worker = BenchWorker(env, Path(tmp) / "worker.log", concurrency=4)
        rows = []
        try:
            print("starting a worker (4 processes) ...", flush=True)
            worker.start(app)
            for backlog in [0, *args.backlogs]:
                print(f"  backlog {backlog:,} ...", flush=True)
                rows.append(
                    scenario(app, broker, state, worker, backlog, args.task_ms, args.delay_s)
                )
        except Exception:
            print(f"worker log (last lines):\n{worker.log_tail()}", file=sys.stderr)
            raise
        finally:
            worker.stop()
            app.close()
            broker.close()
            state.close()
    report(rows, args.task_ms)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump({"task_ms": args.task_ms, "rows": rows}, out, indent=2)
    print(f"  written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
