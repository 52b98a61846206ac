"""Plain vs governed Celery tasks on one real worker: throughput of each, in one run, interleaved.

One Redis (database 0 the broker and result backend, database 1 the governance state, as in the
README and docker-compose), one ``celery worker -P prefork -c 2`` running
:mod:`governance.bench.bench_app`, whose app carries both a plain ungoverned task
(``bench.noop``) and the governed ``bench.echo``. The benchmark publishes alternating batches,
plain, governed, plain, governed, ..., and times each batch from its first publish until the
last of its results has arrived.

Why this is fair: both kinds share the broker, the worker, its pool, the app's settings (late
acks, prefetch 1, task events, results stored with ``task_track_started``), the same keyword
arguments and the same completion signal: every task is published with ``apply_async`` and the
batch ends when ``ResultSet.join_native`` (the result backend's pub/sub, no polling) has seen all
of them succeed. Interleaving the batches spreads the noise of a shared machine over both kinds.
The difference is the governance itself: context headers, authorization at publish and at the
worker, the ledger record, admission, lease, settlement, usage and two sealed audit entries per
task, with every check of the policy switched on (rate limit, concurrency, budgets of every kind
per day, month and run, long-running limits).

A third kind, ``bench.round_trips``, interleaved with the other two, is the yardstick: a plain
task that makes the Redis round trips of a governed one (the publisher's transaction, two script
calls in the worker) with scripts that return at once and no other work. Its ratio to plain is
the ceiling, on this machine, of any design that makes those round trips; the governed ratio
can only be lower.

Redis work per governed task is counted at the server, from ``INFO commandstats``: script calls
(``EVALSHA`` + ``EVAL``) during the governed batches, minus the background rate seen during the
plain batches (the worker's maintenance thread, kombu's binding refresh). A governed task needs
two: admission and settlement, each writing its audit entry (seals ride along on the next call,
or in a batch of their own when no call comes soon). The total of commands the server executed
per task (broker, results and state, including commands run inside scripts) is reported for both
kinds, per command name in the JSON.
CPU per task is read for each process that serves a batch: this process (the publisher, which
also reads the results), the worker's main process and its pool processes (``/proc``, Linux), and
the Redis server (``INFO cpu``: all of its work, so with ``REDIS_URL`` other clients' too); on 2
cores they all share the machine, so the governed task's extra CPU, wherever it is spent, is what
its throughput pays for.
The governed batches above are published all at once: the worker's pool saturates (messages
wait in the broker), so most governed tasks take fair dispatch's saturated path (they wait from
publication and are handed on by the pool: more script calls per task). The governed kind is
then measured a second time, paced (``--paced-tasks`` published at ``--paced-fraction`` of the
flooded governed throughput, after as many plain tasks at the same pace): below what the pool
can run, so it never saturates and each task takes the hot path (the same calls as without fair
dispatch). For both, the tasks that waited for the pool (their audit entries) are counted, so
the report says which path was measured.
Admission+settlement latency and the 10 vs 10,000 tenants scale come from
:mod:`governance.bench.store_bench`, run against the same Redis after the worker has stopped.
With ``REDIS_URL`` set, that server is used instead of a private one (databases 0 and 1 are
flushed).

Run: ``python -m governance.bench.celery_bench [--tasks N] [--rounds R] [--paced-tasks N]
[--paced-fraction F] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
import yaml
from celery import Celery
from celery.result import ResultSet

from governance.bench import store_bench
from governance.bench.bench_app import (
    GOVERNED_TASK,
    PLAIN_TASK,
    ROUND_TRIPS_TASK,
    create_bench_app,
)
from governance.embedded import EmbeddedRedis
from governance.embedded.processes import log_tail, stop_processes
from governance.integration import GovernanceHeaders
from governance.policy.context import ActionContext
from governance.settings import GovernanceSettings
from governance.store import Period, StateStore, read_usage
from governance.store.keys import TenantKeys

TENANT = "bench"
CONTEXT = ActionContext(tenant=TENANT, agent="bench-agent", run="bench-run")
KINDS = ("plain", "governed", "round_trips")
#: Top-level commands that run a script; the commands a script runs are counted apart.
SCRIPTS = ("evalsha", "eval")
#: Huge limits, but every kind of check on, so each governed task pays for all of them.
_BUDGET = {"steps": 10**8, "tool_calls": 10**8, "tokens": 10**9, "cost_usd": 1_000_000}
BENCH_POLICY: dict[str, Any] = {
    "version": 1,
    "tools": {"echo": "compute"},
    "defaults": {"tiers": {"default": "act_auto"}},
    "tenants": {
        TENANT: {
            "allowed_tools": ["echo"],
            "concurrency": 1000,
            "rate_limits": {"tenant": {"rate": 100_000, "per": "1s"}},
            "budgets": [
                {"period": "day", **_BUDGET},
                {"period": "month", **_BUDGET},
                {"period": "run", **_BUDGET},
            ],
            "long_running": "unlimited",
        }
    },
}
#: Tasks of each kind run before timing: worker children fork, connect and load the scripts.
WARM_UP_TASKS = 20
BATCH_TIMEOUT_S = 300.0


# -- environment -------------------------------------------------------------------------------


@contextmanager
def _redis_base_url() -> Iterator[tuple[str, bool]]:
    """The Redis server to use and whether it is the caller's (``REDIS_URL``, flushed) or ours."""
    if url := os.environ.get("REDIS_URL"):
        yield url, True
        return
    with EmbeddedRedis() as server:
        yield server.url, False


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def bench_env(base_url: str, workdir: Path) -> dict[str, str]:
    """The ``GOVERNANCE_*`` variables of the benchmark: read by the worker and the publisher."""
    policy = workdir / "bench-policy.yaml"
    policy.write_text(yaml.safe_dump(BENCH_POLICY, sort_keys=False), encoding="utf-8")
    return {
        "GOVERNANCE_BROKER_URL": _with_db(base_url, 0),
        "GOVERNANCE_STATE_REDIS_URL": _with_db(base_url, 1),
        "GOVERNANCE_CONFIG_PATH": str(policy),
        "GOVERNANCE_WORKSPACE_DIR": str(workdir / "workspace"),
        "GOVERNANCE_AUDIT_KEY": "bench-audit-key",
    }


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly ``env`` as the process's ``GOVERNANCE_*`` variables, restored afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("GOVERNANCE_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        for name in env:
            os.environ.pop(name, None)
        os.environ.update(saved)


def publisher_app(env: Mapping[str, str]) -> Celery:
    """An app built exactly like the worker's: the same settings, from the same variables."""
    with _environment(env):
        return create_bench_app(GovernanceSettings())


class BenchWorker:
    """The ``celery worker`` process (prefork) serving :mod:`governance.bench.bench_app`."""

    def __init__(self, env: Mapping[str, str], log_path: Path, concurrency: int) -> None:
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GOVERNANCE_") and k != "REDIS_URL"
        }
        self.env = {**inherited, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, app: Celery, timeout_s: float = 90.0) -> None:
        with self.log_path.open("ab") as log:
            # Its own session: a Ctrl-C reaches only the benchmark, which then stops the worker.
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "governance.bench.bench_app",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    str(self.concurrency),
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=WARNING",
                    "-n",
                    f"bench-{os.getpid()}@%h",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not app.control.ping(timeout=0.5):
            if self.process.poll() is not None:
                raise RuntimeError(f"the benchmark worker exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the benchmark worker did not answer a ping in {timeout_s}s")

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to the worker's own process group if stuck."""
        if self.process is not None:
            stop_processes([self.process], timeout_s=30)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


# -- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCounters:
    """What the Redis server has executed so far, per command name (``INFO commandstats``).

    Commands a script runs (``redis.call``) are counted under their own names as well, so the
    script calls themselves are :data:`SCRIPTS`, and the other counts are the server's work.
    """

    by_command: Mapping[str, int]

    @classmethod
    def read(cls, client: redis.Redis) -> ServerCounters:
        stats = client.info("commandstats")
        return cls({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})

    def since(self, before: ServerCounters) -> dict[str, int]:
        """Calls per command name between ``before`` and this reading (the INFO itself left out)."""
        delta = {
            name: calls - before.by_command.get(name, 0) - (1 if name == "info" else 0)
            for name, calls in self.by_command.items()
        }
        return {name: calls for name, calls in delta.items() if calls > 0}


#: The roles whose CPU a batch costs, as reported.
CPU_ROLES = ("publisher", "worker_main", "pool", "redis")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (``/proc``), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` forked (its pool processes), from ``/proc``; [] if unreadable."""
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", encoding="ascii") as listed:
                children += [int(child) for child in listed.read().split()]
        except OSError:
            continue
    return children


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds used so far by the processes serving the benchmark: this one, the worker's
    main process, each pool process (by pid) and the Redis server; None where unreadable."""

    publisher: float
    worker_main: float | None
    pool: Mapping[int, float]
    redis_server: float | None

    @classmethod
    def read(cls, worker_pid: int | None, client: redis.Redis) -> CpuReading:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        pool: dict[int, float] = {}
        for child in child_pids(worker_pid) if worker_pid else []:
            if (cpu := process_cpu_s(child)) is not None:
                pool[child] = cpu
        info = client.info("cpu")
        try:
            server: float | None = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        except (KeyError, TypeError, ValueError):  # a server that does not report its CPU
            server = None
        return cls(
            publisher=usage.ru_utime + usage.ru_stime,
            worker_main=process_cpu_s(worker_pid) if worker_pid else None,
            pool=pool,
            redis_server=server,
        )

    def since(self, before: CpuReading) -> dict[str, float]:
        """CPU seconds per role between ``before`` and this reading; a role that could not be
        read is left out, and a pool process counts only if it served the whole batch."""
        used = {"publisher": self.publisher - before.publisher}
        if self.worker_main is not None and before.worker_main is not None:
            used["worker_main"] = self.worker_main - before.worker_main
        common = self.pool.keys() & before.pool.keys()
        if common:
            used["pool"] = sum(self.pool[pid] - before.pool[pid] for pid in common)
        if self.redis_server is not None and before.redis_server is not None:
            used["redis"] = self.redis_server - before.redis_server
        return used


@dataclass(frozen=True)
class Batch:
    """One timed batch of one kind, and what the Redis server executed meanwhile."""

    kind: str
    round_no: int
    tasks: int
    seconds: float
    by_command: Mapping[str, int]
    cpu_s: Mapping[str, float] = field(default_factory=dict)
    #: Tasks that waited for the saturated worker pool meanwhile (fair dispatch handed them on).
    dispatched: int = 0

    @property
    def script_calls(self) -> int:
        return sum(self.by_command.get(name, 0) for name in SCRIPTS)

    @property
    def server_commands(self) -> int:
        return sum(self.by_command.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round_no,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 4),
            "tasks_per_s": round(self.tasks / self.seconds, 1),
            "script_calls": self.script_calls,
            "server_commands": self.server_commands,
            "dispatched_by_the_pool": self.dispatched,
        }


def publish_and_wait(
    app: Celery, kind: str, tasks: int, first: int, rate: float | None = None
) -> None:
    """Publish ``tasks`` tasks of ``kind`` (all at once, or ``rate`` per second) and return
    once every one of them has succeeded."""
    headers: dict[str, Any] = {}
    if kind == "governed":
        task = app.tasks[GOVERNED_TASK]
        headers = GovernanceHeaders(context=CONTEXT).to_headers()
    else:
        task = app.tasks[PLAIN_TASK if kind == "plain" else ROUND_TRIPS_TASK]
    results: list[Any] = []
    started = time.perf_counter()
    try:
        for i in range(tasks):
            if rate is not None:
                time.sleep(max(0.0, started + i / rate - time.perf_counter()))
            results.append(
                task.apply_async(kwargs={"text": f"bench-{first + i}"}, headers=dict(headers))
            )
        values = ResultSet(results, app=app).join_native(timeout=BATCH_TIMEOUT_S, propagate=True)
    except KeyboardInterrupt:
        # Stop waiting now, while Redis is up: each result would otherwise unsubscribe from the
        # result backend when collected at interpreter exit, after Redis stopped, and print noise.
        for result in results:
            app.backend.remove_pending_result(result)
        raise
    if len(values) != tasks:
        raise RuntimeError(f"{kind} batch: {len(values)} results for {tasks} tasks")


def server_ms(state: redis.Redis | None) -> int:
    """The state server's clock (ms): the audit streams' entry ids are written in it."""
    if state is None:
        return 0
    seconds, micros = state.time()
    return int(seconds) * 1000 + int(micros) // 1000


def waited_for_the_pool(state: redis.Redis | None, since_ms: int, until_ms: int) -> int:
    """How many governed tasks began to wait between ``since_ms`` and ``until_ms`` (their
    audit entries ``waiting``): the benchmark tenant's limits never make a task wait, so each
    one waited for the saturated pool, and fair dispatch handed it on."""
    if state is None:
        return 0
    entries = state.xrange(TenantKeys(TENANT).audit, min=str(since_ms), max=str(until_ms))
    return sum(1 for _, fields in entries or [] if (fields or {}).get(b"type") == b"waiting")


def run_batch(
    app: Celery,
    client: redis.Redis,
    kind: str,
    round_no: int,
    tasks: int,
    worker_pid: int | None = None,
    rate: float | None = None,
    state: redis.Redis | None = None,
) -> Batch:
    before = ServerCounters.read(client)
    since_ms = server_ms(state)
    cpu_before = CpuReading.read(worker_pid, client)
    started = time.perf_counter()
    publish_and_wait(app, kind, tasks, first=round_no * 1_000_000, rate=rate)
    seconds = time.perf_counter() - started
    cpu_s = CpuReading.read(worker_pid, client).since(cpu_before)
    by_command = ServerCounters.read(client).since(before)
    dispatched = waited_for_the_pool(state, since_ms, server_ms(state))
    return Batch(kind, round_no, tasks, seconds, by_command, cpu_s, dispatched)


def batch_sizes(total: int, rounds: int) -> list[int]:
    """``rounds`` batch sizes that add up to ``total``, as even as possible."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def run_rounds(
    app: Celery,
    client: redis.Redis,
    tasks: int,
    rounds: int,
    out: TextIO = sys.stdout,
    worker_pid: int | None = None,
    state: redis.Redis | None = None,
) -> list[Batch]:
    """Plain, governed, round trips, plain, ...: ``tasks`` of each kind in ``rounds`` rounds."""
    batches: list[Batch] = []
    for round_no, size in enumerate(batch_sizes(tasks, rounds), start=1):
        for kind in KINDS:
            batch = run_batch(app, client, kind, round_no, size, worker_pid, state=state)
            batches.append(batch)
            print(
                f"  round {round_no}/{rounds} {kind:<11} {size:>6} tasks in {batch.seconds:7.2f} s"
                f"  ({size / batch.seconds:8.1f} tasks/s)",
                file=out,
                flush=True,
            )
    return batches


def summarize(batches: list[Batch]) -> dict[str, Any]:
    """Throughput per kind, their ratios to plain, and the Redis server's work per task (the
    round-trips kind only when ``batches`` measured it)."""
    kinds: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    scripts: dict[str, int] = {}
    for kind in KINDS:
        mine = [b for b in batches if b.kind == kind]
        if not mine:
            continue
        tasks = sum(b.tasks for b in mine)
        seconds[kind] = sum(b.seconds for b in mine)
        scripts[kind] = sum(b.script_calls for b in mine)
        by_command: dict[str, int] = {}
        for batch in mine:
            for name, calls in batch.by_command.items():
                by_command[name] = by_command.get(name, 0) + calls
        kinds[kind] = {
            "cpu_ms_per_task": cpu_ms_per_task(mine),
            "tasks": tasks,
            "seconds": round(seconds[kind], 3),
            "tasks_per_s": round(tasks / seconds[kind], 1),
            "server_commands_per_task": round(sum(by_command.values()) / tasks, 2),
            "server_commands_per_task_by_name": {
                name: round(calls / tasks, 2)
                for name, calls in sorted(by_command.items(), key=lambda item: -item[1])
                if calls / tasks >= 0.05
            },
            "batches": [b.as_json() for b in mine],
        }
    # Ratios to plain from the unrounded rates.
    rates = {kind: kinds[kind]["tasks"] / seconds[kind] for kind in kinds}
    to_plain = {kind: round(rate / rates["plain"], 3) for kind, rate in rates.items()}
    plain, governed = kinds["plain"], kinds["governed"]
    # Plain tasks never touch governance state: what scripts ran meanwhile is background.
    background_per_s = scripts["plain"] / seconds["plain"]
    net_scripts = scripts["governed"] - background_per_s * seconds["governed"]
    dispatched = sum(b.dispatched for b in batches if b.kind == "governed")
    governed["dispatched_by_the_pool"] = dispatched
    governed["script_calls_per_task"] = round(net_scripts / governed["tasks"], 3)
    summary = {
        "plain": plain,
        "governed": governed,
        "governed_to_plain_ratio": to_plain["governed"],
        "script_calls_per_governed_task": round(net_scripts / governed["tasks"], 3),
        "script_calls_per_governed_task_raw": round(scripts["governed"] / governed["tasks"], 3),
        "background_script_calls_per_s": round(background_per_s, 2),
    }
    if round_trips := kinds.get("round_trips"):
        summary["round_trips"] = round_trips
        summary["round_trips_to_plain_ratio"] = to_plain["round_trips"]
    return summary


def run_paced(
    app: Celery,
    client: redis.Redis,
    tasks: int,
    rate: float,
    worker_pid: int | None,
    state: redis.Redis,
    out: TextIO = sys.stdout,
) -> list[Batch]:
    """Plain, then governed tasks, ``tasks`` of each published at ``rate`` per second: below
    what the pool can run, so it never saturates (the governed tasks' hot path)."""
    batches = []
    for kind in ("plain", "governed"):
        batch = run_batch(app, client, kind, 0, tasks, worker_pid, rate=rate, state=state)
        batches.append(batch)
        print(
            f"  paced {kind:<8} {tasks:>6} tasks at {rate:.0f}/s in {batch.seconds:7.2f} s"
            f"  ({batch.dispatched} waited for the pool)",
            file=out,
            flush=True,
        )
    return batches


def summarize_paced(batches: list[Batch], background_per_s: float, rate: float) -> dict[str, Any]:
    """The paced batches' figures: throughput (the pace, when the worker kept up), script calls
    per governed task (the background subtracted, as for the flooded batches), CPU per task."""
    plain, governed = batches
    net_scripts = governed.script_calls - background_per_s * governed.seconds
    return {
        "rate_per_s": round(rate, 1),
        "tasks": governed.tasks,
        "plain": {
            "tasks_per_s": round(plain.tasks / plain.seconds, 1),
            "cpu_ms_per_task": cpu_ms_per_task([plain]),
            "server_commands_per_task": round(plain.server_commands / plain.tasks, 2),
        },
        "governed": {
            "tasks": governed.tasks,
            "tasks_per_s": round(governed.tasks / governed.seconds, 1),
            "cpu_ms_per_task": cpu_ms_per_task([governed]),
            "script_calls_per_task": round(net_scripts / governed.tasks, 3),
            "server_commands_per_task": round(governed.server_commands / governed.tasks, 2),
            "dispatched_by_the_pool": governed.dispatched,
        },
    }


def cpu_ms_per_task(batches: list[Batch]) -> dict[str, float]:
    """CPU milliseconds per task of each role (over the batches that could read it), and their
    total when every role was read."""
    per_task: dict[str, float] = {}
    for role in CPU_ROLES:
        read = [b for b in batches if role in b.cpu_s]
        if read:
            tasks = sum(b.tasks for b in read)
            per_task[role] = round(sum(b.cpu_s[role] for b in read) / tasks * 1000, 3)
    if len(per_task) == len(CPU_ROLES):
        per_task["total"] = round(sum(per_task.values()), 3)
    return per_task


def check_governed_usage(state_url: str, expected_steps: int) -> int:
    """Steps the governance state counted for the benchmark run: one per governed task."""
    state = StateStore(redis.Redis.from_url(state_url))
    try:
        steps = read_usage(state, TENANT, Period.RUN, run=CONTEXT.run).used.steps
    finally:
        state.close()
    if steps != expected_steps:
        raise RuntimeError(
            f"the state counted {steps} governed steps, expected {expected_steps}: some governed "
            "tasks were not admitted and settled exactly once"
        )
    return steps


def store_figures(state_url: str, store_tasks: int, scale_tenants: int) -> dict[str, Any]:
    """Admission+settlement latency and the tenant scale, from the store micro-benchmark."""
    pool = redis.ConnectionPool.from_url(state_url, connection_class=store_bench.CountingConnection)
    state = StateStore(redis.Redis(connection_pool=pool))
    try:
        state.client.flushdb()
        result = store_bench.measure_round_trip(state, store_tasks)
        state.client.flushdb()
        result.update(store_bench.measure_redis_cpu(state, store_tasks))
        state.client.flushdb()
        small = store_bench.measure_tenant_scale(state, 10, store_tasks)
        state.client.flushdb()
        large = store_bench.measure_tenant_scale(state, scale_tenants, store_tasks)
        state.client.flushdb()
    finally:
        state.close()
        pool.disconnect()
    result["scale_tenants"] = scale_tenants
    result["admission_p50_ms_10_tenants"] = round(small, 3)
    result["admission_p50_ms_many_tenants"] = round(large, 3)
    result["tenant_scale_ratio"] = round(large / small, 3)
    return result


def report(result: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """Print the figures a reader compares, one per line."""
    plain, governed, store = result["plain"], result["governed"], result["store"]
    paced = result["paced"]
    bare = result["round_trips"]
    rows = [
        (
            "plain tasks per second (bench.noop)",
            f"{plain['tasks_per_s']} ({plain['tasks']} tasks in {plain['seconds']} s)",
        ),
        (
            "governed tasks per second (bench.echo)",
            f"{governed['tasks_per_s']} ({governed['tasks']} tasks in {governed['seconds']} s)",
        ),
        ("governed / plain throughput", str(result["governed_to_plain_ratio"])),
        (
            "bare round trips / plain throughput",
            f"{result['round_trips_to_plain_ratio']} ({bare['tasks_per_s']} tasks/s of "
            f"bench.round_trips, CPU {bare['cpu_ms_per_task'].get('total', 'n/a')} ms per task: "
            "a governed task's round trips without their work, the ceiling of any design that "
            "makes them)",
        ),
        (
            "script calls per governed task (server)",
            f"{result['script_calls_per_governed_task']} (INFO commandstats EVALSHA+EVAL; "
            f"background of {result['background_script_calls_per_s']}/s subtracted)",
        ),
        (
            "server commands per task, plain/governed",
            f"{plain['server_commands_per_task']} / {governed['server_commands_per_task']} "
            "(broker, results and state; commands run inside scripts included)",
        ),
        ("CPU ms per task, plain/governed", _cpu_row(plain, governed)),
        (
            "governed, flooded (saturated pool)",
            _governed_row(governed),
        ),
        (
            f"governed, paced at {paced['rate_per_s']}/s",
            _governed_row(paced["governed"])
            + f"; plain paced CPU {paced['plain']['cpu_ms_per_task'].get('total', 'n/a')} ms",
        ),
        (
            "admit+settle latency p50 / p99 (1 client)",
            f"{store['admit_settle_p50_ms']} ms / {store['admit_settle_p99_ms']} ms "
            f"({store['redis_round_trips_per_task']} round trips)",
        ),
        (
            "state Redis CPU per governed task (1 client)",
            f"{store['redis_cpu_us_per_governed_task']} us, sealed: ledger record, admission, "
            f"settlement (about {store['governed_tasks_per_s_per_redis_core']:,} governed "
            "tasks/s per Redis core)",
        ),
        (
            f"admission p50, 10 vs {store['scale_tenants']:,} tenants",
            f"{store['admission_p50_ms_10_tenants']} ms vs "
            f"{store['admission_p50_ms_many_tenants']} ms (ratio {store['tenant_scale_ratio']})",
        ),
    ]
    print(
        f"Celery benchmark: plain vs governed tasks, one worker (prefork, {result['concurrency']} "
        f"processes), one Redis, {result['rounds']} interleaved rounds, this machine",
        file=out,
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}} : {value}", file=out)


def _governed_row(kind: Mapping[str, Any]) -> str:
    """``312.4 tasks/s, 3.61 script calls and 7.1 ms CPU per task, 78% dispatched by the
    pool``: one way of sending governed tasks."""
    tasks = kind.get("tasks") or 0
    dispatched = kind.get("dispatched_by_the_pool", 0)
    share = f"{dispatched / tasks:.0%}" if tasks else str(dispatched)
    return (
        f"{kind['tasks_per_s']} tasks/s, {kind['script_calls_per_task']} script calls and "
        f"{kind['cpu_ms_per_task'].get('total', 'n/a')} ms CPU per task, {dispatched} tasks "
        f"({share}) waited for the pool"
    )


def _cpu_row(plain: Mapping[str, Any], governed: Mapping[str, Any]) -> str:
    """``publisher 1.25 / 1.62, ..., total 3.95 / 5.58 (+1.63)``: each role, both kinds."""
    a, b = plain["cpu_ms_per_task"], governed["cpu_ms_per_task"]
    row = ", ".join(
        f"{role.replace('_', ' ')} {a.get(role, 'n/a')} / {b.get(role, 'n/a')}"
        for role in (*CPU_ROLES, "total")
    )
    if "total" in a and "total" in b:
        row += f" ({b['total'] - a['total']:+.3f})"
    return row


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=_positive, default=5_000, help="tasks of each kind")
    parser.add_argument("--rounds", type=_positive, default=4, help="plain+governed rounds")
    parser.add_argument("--concurrency", type=_positive, default=2, help="worker processes")
    parser.add_argument(
        "--store-tasks", type=_positive, default=2_000, help="admit+settle samples (store)"
    )
    parser.add_argument(
        "--scale-tenants", type=_positive, default=10_000, help="tenants of the scale test"
    )
    parser.add_argument(
        "--paced-tasks",
        type=_positive,
        default=None,
        help="governed (and plain) tasks, paced (default: --tasks, at most 2,000)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="the pace, as a fraction of the flooded governed throughput",
    )
    parser.add_argument("--json", default="bench-results.json", help="where to write JSON")
    args = parser.parse_args(argv)
    if args.paced_tasks is None:
        args.paced_tasks = min(args.tasks, 2_000)
    if args.rounds > args.tasks:
        parser.error(f"--rounds ({args.rounds}) cannot exceed --tasks ({args.tasks})")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp,
        _redis_base_url() as (base_url, external),
    ):
        env = bench_env(base_url, Path(tmp))
        state_url = env["GOVERNANCE_STATE_REDIS_URL"]
        client = redis.Redis.from_url(env["GOVERNANCE_BROKER_URL"])
        state = redis.Redis.from_url(state_url)
        if external:
            client.flushdb()
            with redis.Redis.from_url(state_url) as state_client:
                state_client.flushdb()
        app = publisher_app(env)
        worker = BenchWorker(env, Path(tmp) / "worker.log", args.concurrency)
        try:
            print(f"starting a worker ({args.concurrency} processes) ...", flush=True)
            worker.start(app)
            for kind in KINDS:
                publish_and_wait(app, kind, WARM_UP_TASKS, first=0)
            worker_pid = worker.process.pid if worker.process else None
            result = summarize(
                run_rounds(app, client, args.tasks, args.rounds, worker_pid=worker_pid, state=state)
            )
            rate = args.paced_fraction * result["governed"]["tasks_per_s"]
            paced = run_paced(app, client, args.paced_tasks, rate, worker_pid, state)
            result["paced"] = summarize_paced(paced, result["background_script_calls_per_s"], rate)
            check_governed_usage(state_url, WARM_UP_TASKS + args.tasks + args.paced_tasks)
        except KeyboardInterrupt:
            print("interrupted: stopping the worker and Redis", file=sys.stderr)
            return 130
        except Exception:
            print(f"worker log (last lines):\n{worker.log_tail()}", file=sys.stderr)
            raise
        finally:
            worker.stop()
            app.close()
            client.close()
            state.close()
        print("measuring the store (admission + settlement, tenant scale) ...", flush=True)
        result["store"] = store_figures(state_url, args.store_tasks, args.scale_tenants)
    result.update(
        tasks_per_kind=args.tasks,
        rounds=args.rounds,
        concurrency=args.concurrency,
        pool="prefork",
        elapsed_s=round(time.monotonic() - started, 1),
    )
    report(result)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"  written to {args.json} (whole run: {result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
