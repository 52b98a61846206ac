"""Governed Celery tasks against an ungoverned app's, on real workers: throughput and CPU per task.

One Redis (database 0 the broker and result backend, database 1 the governance state, as in the
README and docker-compose) and two ``celery worker -P prefork -c 2``, both running during the
whole benchmark, each serving one app of :mod:`governance.bench.bench_app` from its own queue:

- the **plain** worker serves ``plain_app``, an app on which ``govern()`` was never called (none
  of its signal handlers, its consumer, its publishing wrapper or its settings), from the queue
  ``bench-plain``: ``bench.noop``, the plain task, and ``bench.round_trips``, the yardstick;
- the **governed** worker serves ``app``, governed with ``govern(app, settings)``, from Celery's
  default queue: ``bench.echo``, a governed tool call.

Both apps have the same broker, result backend and Celery settings (late acks, prefetch 1,
results stored with ``task_track_started`` and ``result_extended``), and each worker the same
options. Every task is published from this process with ``apply_async`` and the same keyword
arguments; once ``ResultSet.join_native`` (the result backend's pub/sub, no polling) has seen
all of a batch's tasks succeed, the batch is timed from its first publication until the worker
stored the last of its results (their ``date_done``: Celery's result consumer can see the last
one later, by up to its wait interval, whatever the kind). What differs is governance itself:
``govern()``'s settings and signal handlers, context headers, authorization at publish and at the
worker, the ledger record, admission, lease, settlement, usage and two sealed audit entries per
task, with every check of the policy switched on (rate limit, concurrency, budgets of every kind
per day, month and run, long-running limits). Batches of the kinds are interleaved, so that the
noise of a shared machine is spread over all of them.

The yardstick, ``bench.round_trips``, is an ungoverned task that makes a governed one's Redis
round trips (the publisher's MULTI/EXEC transaction, two script calls in the worker) with scripts
that return at once and no other work. Its throughput is the ceiling, on this machine, of any
design that makes those round trips, and governed minus yardstick is what governance costs
beyond them.

**Flooded rounds** (``--tasks`` of each kind over ``--rounds`` rounds: plain, governed, round
trips, plain, ...): each batch is published all at once, so the pool saturates (messages wait in
the broker) and most governed tasks take fair dispatch's saturated path (they wait from
publication and are handed on by the pool: more script calls per task).

**Paced rounds**, the hot path, on which the targets are set: ``--paced-rounds`` (3) rounds of
plain, round trips, governed, ``--paced-tasks`` of each, all published at one pace,
``--paced-fraction`` of the flooded governed throughput: below what the pool can run, so it never
saturates and each governed task takes the hot path (the same calls as without fair dispatch).
For each round: CPU per task of each kind and "beyond the yardstick" (governed minus round trips
of that round), per process and in total; the report gives the median over the rounds of each
figure (so the medians of the processes need not add up to the median of the totals).
For both, the governed tasks that waited for the pool (their audit entries) are counted, so the
report says which path was measured.

**For reference**, one flooded batch of ``bench.noop`` (``--reference-tasks``) on
``defaults_app``, with Celery's default settings (early acks, prefetch 4 per process, no
``STARTED`` state, no extended results; the result backend still set, so that completion can be
awaited), served by a third worker started for it alone after the paced rounds: what the
benchmark's settings cost a plain task by themselves.

Redis work per governed task is counted at the server, from ``INFO commandstats``: script calls
(``EVALSHA`` + ``EVAL``) during the governed batches, minus the background rate seen during the
plain batches (the governed worker, idle meanwhile: its maintenance thread, kombu's binding
refresh). A governed task needs two: admission and settlement, each writing its audit entry
(seals ride along on the next call, or in a batch of their own when no call comes soon). The
total of commands the server executed per task (broker, results and state, including commands run
inside scripts) is reported for each kind, per command name in the JSON.
CPU per task is read for each process that serves a batch: this process (the publisher, which
also reads the results), the main process and the pool processes of the worker that served the
batch (``/proc``, Linux; the other, idle worker is not counted), and the Redis server (``INFO
cpu``: all of its work, the idle worker's polling included, and with ``REDIS_URL`` other clients'
too); on 2 cores they all share the machine, so the governed task's extra CPU, wherever it is
spent, is what its throughput pays for.
Admission+settlement latency and the 10 vs 10,000 tenants scale come from
:mod:`governance.bench.store_bench`, run against the same Redis after the workers have stopped.
With ``REDIS_URL`` set, that server is used instead of a private one (databases 0 and 1 are
flushed).

Run: ``python -m governance.bench.celery_bench [--tasks N] [--rounds R] [--paced-tasks N]
[--paced-rounds R] [--paced-fraction F] [--reference-tasks N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
import yaml
from celery import Celery
from celery.result import AsyncResult, ResultSet

from governance.bench import store_bench
from governance.bench.bench_app import (
    DEFAULTS_QUEUE,
    GOVERNED_TASK,
    PLAIN_QUEUE,
    PLAIN_TASK,
    ROUND_TRIPS_TASK,
    create_bench_app,
    create_defaults_app,
    create_plain_app,
)
from governance.embedded import EmbeddedRedis
from governance.embedded.processes import log_tail, stop_processes
from governance.integration import GovernanceHeaders, runtime_for
from governance.policy.context import ActionContext
from governance.settings import GovernanceSettings
from governance.store import Period, StateStore, read_usage
from governance.store.keys import TenantKeys

TENANT = "bench"
CONTEXT = ActionContext(tenant=TENANT, agent="bench-agent", run="bench-run")
#: The kinds of the flooded rounds, in their order; the paced rounds' order.
KINDS = ("plain", "governed", "round_trips")
PACED_KINDS = ("plain", "round_trips", "governed")
#: The reference kind: ``bench.noop`` with Celery's default settings.
DEFAULTS = "celery_defaults"
#: The task each kind publishes.
TASK_OF = {
    "plain": PLAIN_TASK,
    "governed": GOVERNED_TASK,
    "round_trips": ROUND_TRIPS_TASK,
    DEFAULTS: PLAIN_TASK,
}
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
#: How long the result backend's consumer waits for a message at a time while a batch is joined
#: (Celery's default is 0.5 s): it may miss one already read from the socket until the wait
#: ends, which would add that idle time to the batch's CPU readings.
JOIN_INTERVAL_S = 0.05


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


def publisher_app(
    env: Mapping[str, str], build: Callable[[GovernanceSettings], Celery] = create_bench_app
) -> Celery:
    """An app built exactly like a worker's (the governed one unless ``build`` says otherwise):
    the same settings, from the same variables."""
    with _environment(env):
        return build(GovernanceSettings())


#: The ``-A`` of each app of :mod:`governance.bench.bench_app`.
GOVERNED_APP = "governance.bench.bench_app"
PLAIN_APP = "governance.bench.bench_app:plain_app"
DEFAULTS_APP = "governance.bench.bench_app:defaults_app"


class BenchWorker:
    """A ``celery worker`` process (prefork) serving one app of :mod:`governance.bench.bench_app`
    (``app_spec``, the governed one by default), from ``queue`` (else the app's default)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        concurrency: int,
        app_spec: str = GOVERNED_APP,
        queue: str | None = None,
        name: str = "bench",
    ) -> None:
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GOVERNANCE_") and k != "REDIS_URL"
        }
        self.env = {**inherited, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.app_spec = app_spec
        self.queue = queue
        #: Its own node name, so that a ping finds it among the other workers of the broker.
        self.nodename = f"{name}-{os.getpid()}@{socket.gethostname()}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, app: Celery, timeout_s: float = 90.0) -> None:
        self.launch()
        self.wait_ready(app, timeout_s)

    def launch(self) -> None:
        """Start the process, without waiting for it to serve (see :meth:`wait_ready`)."""
        queues = ["-Q", self.queue] if self.queue else []
        with self.log_path.open("ab") as log:
            # Its own session: a Ctrl-C reaches only the benchmark, which then stops the worker.
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    self.app_spec,
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    str(self.concurrency),
                    *queues,
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=WARNING",
                    "-n",
                    self.nodename,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, app: Celery, timeout_s: float = 90.0) -> None:
        """Return once the worker answers a ping (sent with ``app``, on its broker)."""
        if self.process is None:
            raise RuntimeError("the benchmark worker was not launched")
        deadline = time.monotonic() + timeout_s
        while not app.control.ping(destination=[self.nodename], timeout=0.5):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the benchmark worker {self.nodename} exited at start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the benchmark worker {self.nodename} did not answer a ping in {timeout_s}s"
                )

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to the worker's own process group if stuck."""
        if self.process is not None:
            stop_processes([self.process], timeout_s=30)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


@dataclass(frozen=True)
class Served:
    """Where the tasks of one kind go: the app that publishes them, and the pid of the worker
    that serves them (its CPU and its pool's are that kind's)."""

    app: Celery
    worker_pid: int | None


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
    #: How much later than its worker stored it the join saw the last result (not in ``seconds``).
    seen_late_s: float = 0.0

    @property
    def script_calls(self) -> int:
        return sum(self.by_command.get(name, 0) for name in SCRIPTS)

    @property
    def server_commands(self) -> int:
        return sum(self.by_command.values())

    def cpu_ms_total(self) -> float | None:
        """CPU milliseconds per task of every role together, None unless each was read."""
        if not all(role in self.cpu_s for role in CPU_ROLES):
            return None
        return sum(self.cpu_s[role] for role in CPU_ROLES) / self.tasks * 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round_no,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 4),
            "tasks_per_s": round(self.tasks / self.seconds, 1),
            "script_calls": self.script_calls,
            "server_commands": self.server_commands,
            "dispatched_by_the_pool": self.dispatched,
            "last_result_seen_late_s": round(self.seen_late_s, 4),
        }


def publish_and_wait(
    app: Celery, kind: str, tasks: int, first: int, rate: float | None = None
) -> list[AsyncResult]:
    """Publish ``tasks`` tasks of ``kind`` with ``app`` (all at once, or ``rate`` per second)
    and return their results once every one of them has succeeded."""
    task = app.tasks[TASK_OF[kind]]
    headers: dict[str, Any] = {}
    if kind == "governed":
        headers = GovernanceHeaders(context=CONTEXT).to_headers()
    results: list[AsyncResult] = []
    started = time.perf_counter()
    try:
        for i in range(tasks):
            if rate is not None:
                time.sleep(max(0.0, started + i / rate - time.perf_counter()))
            results.append(
                task.apply_async(kwargs={"text": f"bench-{first + i}"}, headers=dict(headers))
            )
        values = ResultSet(results, app=app).join_native(
            timeout=BATCH_TIMEOUT_S, propagate=True, interval=JOIN_INTERVAL_S
        )
    except KeyboardInterrupt:
        # Stop waiting now, while Redis is up: each result would otherwise unsubscribe from the
        # result backend when collected at interpreter exit, after Redis stopped, and print noise.
        for result in results:
            app.backend.remove_pending_result(result)
        raise
    if len(values) != tasks:
        raise RuntimeError(f"{kind} batch: {len(values)} results for {tasks} tasks")
    return results


def last_done(results: list[AsyncResult]) -> float | None:
    """When the worker stored the last of ``results`` (epoch seconds, their ``date_done``), or
    None if one has none. Read from the results the join received (else from the backend)."""
    latest: float | None = None
    for result in results:
        done = result.date_done
        if isinstance(done, str):
            done = datetime.fromisoformat(done)
        if not isinstance(done, datetime):
            return None
        at = (done if done.tzinfo else done.replace(tzinfo=UTC)).timestamp()
        latest = at if latest is None else max(latest, at)
    return latest


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
    served: Served,
    client: redis.Redis,
    kind: str,
    round_no: int,
    tasks: int,
    rate: float | None = None,
    state: redis.Redis | None = None,
) -> Batch:
    """One timed batch of ``kind``, published with ``served.app``; CPU read from its worker."""
    before = ServerCounters.read(client)
    since_ms = server_ms(state)
    cpu_before = CpuReading.read(served.worker_pid, client)
    started, started_at = time.perf_counter(), time.time()
    results = publish_and_wait(served.app, kind, tasks, first=round_no * 1_000_000, rate=rate)
    seconds = time.perf_counter() - started
    cpu_s = CpuReading.read(served.worker_pid, client).since(cpu_before)
    by_command = ServerCounters.read(client).since(before)
    dispatched = waited_for_the_pool(state, since_ms, server_ms(state))
    # The batch ends when the worker stored its last result: the join may see it later.
    done, seen_late_s = last_done(results), 0.0
    if done is not None and 0 < done - started_at < seconds:
        seen_late_s = seconds - (done - started_at)
        seconds = done - started_at
    return Batch(kind, round_no, tasks, seconds, by_command, cpu_s, dispatched, seen_late_s)


def batch_sizes(total: int, rounds: int) -> list[int]:
    """``rounds`` batch sizes that add up to ``total``, as even as possible."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def run_rounds(
    serving: Mapping[str, Served],
    client: redis.Redis,
    tasks: int,
    rounds: int,
    out: TextIO = sys.stdout,
    state: redis.Redis | None = None,
) -> list[Batch]:
    """Plain, governed, round trips, plain, ...: ``tasks`` of each kind in ``rounds`` rounds,
    each batch published all at once (flooded)."""
    batches: list[Batch] = []
    for round_no, size in enumerate(batch_sizes(tasks, rounds), start=1):
        for kind in KINDS:
            batch = run_batch(serving[kind], client, kind, round_no, size, state=state)
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
    serving: Mapping[str, Served],
    client: redis.Redis,
    tasks: int,
    rate: float,
    rounds: int,
    state: redis.Redis | None = None,
    out: TextIO = sys.stdout,
) -> list[Batch]:
    """``rounds`` rounds of plain, round trips, governed, ``tasks`` of each published at
    ``rate`` per second: below what the pool can run, so it never saturates (the governed
    tasks' hot path)."""
    batches = []
    for round_no in range(1, rounds + 1):
        for kind in PACED_KINDS:
            batch = run_batch(serving[kind], client, kind, round_no, tasks, rate=rate, state=state)
            batches.append(batch)
            total = batch.cpu_ms_total()
            print(
                f"  paced round {round_no}/{rounds} {kind:<11} {tasks:>6} tasks at {rate:.0f}/s"
                f" in {batch.seconds:7.2f} s, CPU {'n/a' if total is None else f'{total:.3f}'} ms"
                f" per task  ({batch.dispatched} waited for the pool)",
                file=out,
                flush=True,
            )
    return batches


def median_cpu(figures: list[Mapping[str, float]]) -> dict[str, float]:
    """The median of each role (and of the total) over ``figures``, one per round; a role
    missing from any round is left out."""
    return {
        role: round(statistics.median(f[role] for f in figures), 3)
        for role in (*CPU_ROLES, "total")
        if figures and all(role in f for f in figures)
    }


def beyond_yardstick(
    governed: Mapping[str, float], round_trips: Mapping[str, float]
) -> dict[str, float]:
    """CPU ms per task a governed task used beyond the yardstick's, per role (and in total)."""
    return {
        role: round(governed[role] - round_trips[role], 3)
        for role in (*CPU_ROLES, "total")
        if role in governed and role in round_trips
    }


def summarize_paced(batches: list[Batch], background_per_s: float, rate: float) -> dict[str, Any]:
    """The paced rounds' figures: for each round, CPU per task of each kind and governed minus
    round trips (beyond the yardstick); their medians over the rounds; the throughput of each
    kind (the pace, when the worker kept up); script calls per governed task (the background
    subtracted, as for the flooded batches) and the governed tasks that waited for the pool."""
    rounds = sorted({b.round_no for b in batches})
    of = {(b.kind, b.round_no): b for b in batches}
    by_round: list[dict[str, Any]] = []
    for round_no in rounds:
        figures: dict[str, Any] = {"round": round_no}
        for kind in PACED_KINDS:
            batch = of[kind, round_no]
            figures[kind] = {
                "tasks_per_s": round(batch.tasks / batch.seconds, 1),
                "cpu_ms_per_task": cpu_ms_per_task([batch]),
            }
        figures["beyond_yardstick_cpu_ms_per_task"] = beyond_yardstick(
            figures["governed"]["cpu_ms_per_task"], figures["round_trips"]["cpu_ms_per_task"]
        )
        by_round.append(figures)
    summary: dict[str, Any] = {
        "rate_per_s": round(rate, 1),
        "rounds": len(rounds),
        "tasks_per_round": of[PACED_KINDS[0], rounds[0]].tasks,
    }
    for kind in PACED_KINDS:
        mine = [b for b in batches if b.kind == kind]
        tasks = sum(b.tasks for b in mine)
        seconds = sum(b.seconds for b in mine)
        summary[kind] = {
            "tasks": tasks,
            "tasks_per_s": round(tasks / seconds, 1),
            "cpu_ms_per_task": median_cpu([r[kind]["cpu_ms_per_task"] for r in by_round]),
            "server_commands_per_task": round(sum(b.server_commands for b in mine) / tasks, 2),
            "batches": [b.as_json() for b in mine],
        }
    governed = [b for b in batches if b.kind == "governed"]
    tasks = summary["governed"]["tasks"]
    net_scripts = sum(b.script_calls - background_per_s * b.seconds for b in governed)
    summary["governed"]["script_calls_per_task"] = round(net_scripts / tasks, 3)
    summary["governed"]["dispatched_by_the_pool"] = sum(b.dispatched for b in governed)
    summary["beyond_yardstick_cpu_ms_per_task"] = median_cpu(
        [r["beyond_yardstick_cpu_ms_per_task"] for r in by_round]
    )
    summary["by_round"] = by_round
    return summary


def summarize_reference(batch: Batch) -> dict[str, Any]:
    """The reference batch: ``bench.noop`` on an app with Celery's default settings."""
    return {
        "task": PLAIN_TASK,
        "settings": "Celery's defaults (early acks, default prefetch, no STARTED state, "
        "no extended results; a result backend)",
        "tasks": batch.tasks,
        "seconds": round(batch.seconds, 3),
        "tasks_per_s": round(batch.tasks / batch.seconds, 1),
        "cpu_ms_per_task": cpu_ms_per_task([batch]),
        "server_commands_per_task": round(batch.server_commands / batch.tasks, 2),
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
    paced, reference = result["paced"], result["reference"]
    bare = result["round_trips"]
    paced_rounds = f"median of {paced['rounds']} rounds"
    rows = [
        (
            "plain tasks per second (bench.noop, ungoverned)",
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
        ("CPU ms per task, plain/governed (flooded)", _cpu_row(plain, governed)),
        ("governed, flooded (saturated pool)", _governed_row(governed)),
        (
            f"paced: CPU per task beyond the yardstick ({paced_rounds})",
            _beyond_row(paced),
        ),
        (
            "paced: CPU ms per task, plain/round trips/governed (medians)",
            _cpu_row(paced["plain"], paced["round_trips"], paced["governed"]),
        ),
        (
            "paced: tasks per second, plain/round trips/governed",
            " / ".join(str(paced[kind]["tasks_per_s"]) for kind in PACED_KINDS)
            + f" (published at {paced['rate_per_s']}/s, {paced['rounds']} rounds of "
            f"{paced['tasks_per_round']:,} tasks of each kind)",
        ),
        (f"governed, paced at {paced['rate_per_s']}/s", _governed_row(paced["governed"])),
        (
            "for reference: bench.noop, Celery's defaults",
            f"{reference['tasks_per_s']} tasks/s, CPU ms per task "
            + _cpu_row(reference)
            + f" ({reference['tasks']:,} tasks, flooded; early acks, default prefetch, no "
            "STARTED state, no extended results)",
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
            f"tasks/s per Redis core; median of {store['redis_cpu_us_per_governed_task_runs']})",
        ),
        (
            "maintenance leader per governed task",
            f"{store['leader_cpu_us_per_governed_task']} us CPU + "
            f"{store['leader_redis_cpu_us_per_governed_task']} us Redis (its audit adoption "
            "reads each entry once)",
        ),
        (
            f"admission p50, 10 vs {store['scale_tenants']:,} tenants",
            f"{store['admission_p50_ms_10_tenants']} ms vs "
            f"{store['admission_p50_ms_many_tenants']} ms (ratio {store['tenant_scale_ratio']})",
        ),
    ]
    print(
        "Celery benchmark: an ungoverned app vs a governed one, a worker each (prefork, "
        f"{result['concurrency']} processes), one Redis, {result['rounds']} flooded and "
        f"{paced['rounds']} paced interleaved rounds, this machine",
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


def _cpu_row(*kinds: Mapping[str, Any]) -> str:
    """``publisher 1.25 / 1.62, ..., total 3.95 / 5.58 (+1.63)``: each role, each kind (the
    last one's total against the first one's, when there are several)."""
    figures = [kind["cpu_ms_per_task"] for kind in kinds]
    row = ", ".join(
        f"{role.replace('_', ' ')} " + " / ".join(str(f.get(role, "n/a")) for f in figures)
        for role in (*CPU_ROLES, "total")
    )
    first, last = figures[0], figures[-1]
    if len(figures) > 1 and "total" in first and "total" in last:
        row += f" ({last['total'] - first['total']:+.3f})"
    return row


def _beyond_row(paced: Mapping[str, Any]) -> str:
    """``publisher 0.21, worker main 0.12, pool 0.30, redis 0.10, total 0.73 ms (rounds: 0.70,
    0.73, 0.81)``: governed minus round trips, the median of each role, each round's total."""
    median = paced["beyond_yardstick_cpu_ms_per_task"]
    row = ", ".join(
        f"{role.replace('_', ' ')} " + (f"{median[role]:.2f}" if role in median else "n/a")
        for role in (*CPU_ROLES, "total")
    )
    totals = [r["beyond_yardstick_cpu_ms_per_task"].get("total") for r in paced["by_round"]]
    listed = ", ".join("n/a" if t is None else f"{t:.2f}" for t in totals)
    return f"{row} ms (rounds: {listed})"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=_positive, default=5_000, help="flooded tasks of each kind")
    parser.add_argument(
        "--rounds", type=_positive, default=4, help="flooded plain+governed+round trips rounds"
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=2, help="pool processes of each worker"
    )
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
        help="tasks of each kind in each paced round (default: --tasks, at most 1,000)",
    )
    parser.add_argument(
        "--paced-rounds",
        type=_positive,
        default=3,
        help="paced plain+round trips+governed rounds (the figures are their medians)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="the pace, as a fraction of the flooded governed throughput",
    )
    parser.add_argument(
        "--reference-tasks",
        type=_positive,
        default=None,
        help="bench.noop tasks with Celery's default settings, flooded, for reference "
        "(default: --tasks, at most 1,000)",
    )
    parser.add_argument("--json", default="bench-results.json", help="where to write JSON")
    args = parser.parse_args(argv)
    if args.paced_tasks is None:
        args.paced_tasks = min(args.tasks, 1_000)
    if args.reference_tasks is None:
        args.reference_tasks = min(args.tasks, 1_000)
    if args.rounds > args.tasks:
        parser.error(f"--rounds ({args.rounds}) cannot exceed --tasks ({args.tasks})")
    if not args.paced_fraction > 0:
        parser.error(f"--paced-fraction must be above 0, got {args.paced_fraction}")
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
        plain_app = publisher_app(env, create_plain_app)
        defaults_app = publisher_app(env, create_defaults_app)
        governed_worker = BenchWorker(
            env, Path(tmp) / "worker-governed.log", args.concurrency, name="bench-governed"
        )
        plain_worker = BenchWorker(
            env,
            Path(tmp) / "worker-plain.log",
            args.concurrency,
            app_spec=PLAIN_APP,
            queue=PLAIN_QUEUE,
            name="bench-plain",
        )
        defaults_worker = BenchWorker(
            env,
            Path(tmp) / "worker-defaults.log",
            args.concurrency,
            app_spec=DEFAULTS_APP,
            queue=DEFAULTS_QUEUE,
            name="bench-defaults",
        )
        workers = (governed_worker, plain_worker, defaults_worker)
        try:
            print(
                f"starting an ungoverned and a governed worker ({args.concurrency} processes "
                "each) ...",
                flush=True,
            )
            governed_worker.launch()
            plain_worker.launch()
            governed_worker.wait_ready(app)
            plain_worker.wait_ready(plain_app)
            serving = {
                "plain": Served(plain_app, plain_worker.pid),
                "round_trips": Served(plain_app, plain_worker.pid),
                "governed": Served(app, governed_worker.pid),
            }
            for kind in KINDS:
                publish_and_wait(serving[kind].app, kind, WARM_UP_TASKS, first=0)
            result = summarize(run_rounds(serving, client, args.tasks, args.rounds, state=state))
            rate = args.paced_fraction * result["governed"]["tasks_per_s"]
            paced = run_paced(serving, client, args.paced_tasks, rate, args.paced_rounds, state)
            result["paced"] = summarize_paced(paced, result["background_script_calls_per_s"], rate)
            check_governed_usage(
                state_url, WARM_UP_TASKS + args.tasks + args.paced_rounds * args.paced_tasks
            )
            print("starting a worker with Celery's default settings, for reference ...", flush=True)
            defaults_worker.start(defaults_app)
            reference = Served(defaults_app, defaults_worker.pid)
            publish_and_wait(defaults_app, DEFAULTS, WARM_UP_TASKS, first=0)
            batch = run_batch(reference, client, DEFAULTS, 1, args.reference_tasks, state=state)
            print(
                f"  reference {DEFAULTS} {args.reference_tasks:>6} tasks in {batch.seconds:7.2f} s"
                f"  ({args.reference_tasks / batch.seconds:8.1f} tasks/s)",
                flush=True,
            )
            result["reference"] = summarize_reference(batch)
        except KeyboardInterrupt:
            print("interrupted: stopping the workers and Redis", file=sys.stderr)
            return 130
        except Exception:
            for worker in workers:
                if worker.process is not None:
                    print(
                        f"worker {worker.nodename} log (last lines):\n{worker.log_tail()}",
                        file=sys.stderr,
                    )
            raise
        finally:
            stop_processes([w.process for w in workers if w.process is not None], timeout_s=30)
            # The seals this publisher owes (its entries at publication), while Redis is up.
            runtime_for(app).flush_owed_seals()
            for each in (app, plain_app, defaults_app):
                each.close()
            client.close()
            state.close()
        print("measuring the store (admission + settlement, tenant scale) ...", flush=True)
        result["store"] = store_figures(state_url, args.store_tasks, args.scale_tenants)
    result.update(
        tasks_per_kind=args.tasks,
        rounds=args.rounds,
        concurrency=args.concurrency,
        pool="prefork",
        queues={"plain": PLAIN_QUEUE, "governed": "celery", DEFAULTS: DEFAULTS_QUEUE},
        elapsed_s=round(time.monotonic() - started, 1),
    )
    report(result)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"  written to {args.json} (whole run: {result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
