"""Fair dispatch at the issue's scale: tenants share a saturated worker pool by weight and by
worker time, whatever they send (docs/design.md, section 4.1).

One Redis (database 0 the broker and result backend, database 1 the governance state), one
``celery worker -P prefork -c 4`` (the pool) serving :mod:`governance.bench.bench_app`'s
``bench.llm``, a governed LLM call that sleeps as its message asks. The policy switches off the
long-running limits and sets no run limits or budgets, so that only fairness decides who runs;
each tenant's concurrency is 8, above the pool. Every run starts from empty Redis databases and a
new worker (warmed up by a few calls of a tenant of its own), on an idle pool (not saturated);
each tenant publishes from its own process (as separate clients do), so a flood being published
does not delay the other tenant's calls. Scenarios (``--only``):

1. **behind a flood**: tenant A floods N calls of ``--task-ms`` (500 ms); ``--delay-s`` (3 s)
   later tenant B sends 10. B's last call done (from B's first publication to its last result's
   ``date_done``), alone and behind each N of ``--flood`` (200, 2,000), against B's fair ideal:
   half the pool, 10 x 0.5 s / 2 = 2.5 s. A's drain time (from its first publication to its last
   result) against (N + 10) x 0.5 s / 4. The Redis work per task shows that a backlog costs
   nothing while it waits.
2. **spread**: the same behind ``--spread-calls`` (2,000) calls that A spreads over 1,000 agents
   and 1,000 runs: fairness is keyed by tenant, so B's result is the same as in 1. The run ends
   when B is done (``--drain-spread``: when A is too).
3. **weights**: tenants of weights 1, 2 and 4, all backlogged, calls of ``--weights-task-ms``
   (100 ms): their shares of the worker time over the first ``--weights-dispatches`` (1,400)
   calls to start, warm-up included; and without the first 100 calls, which include what
   entered the broker before the pool saturated (run first come, first served).
4. **long and short calls**: A's calls take 2 s, B's 0.2 s, equal weights, both backlogged:
   each one's share of the worker time over the first ``--share-window-s`` (60 s) from their
   first publication, warm-up included.
5. **alone**: A alone, its concurrency above the pool: the pool's utilisation while A waits.
6. **the broker's queue** (measured during every run, reported for 1): the length of the Celery
   queue in the broker Redis (``LLEN``, sampled every 20 ms), its maximum against the bound of
   what the pool keeps in flight: its capacity plus the prefetch, or plus the slack's worth of
   estimated work per pool process, whichever is more (``pool_dispatch.lua``). Also sampled:
   the worker's unacknowledged deliveries (kombu's ``unacked`` hash) and the pool's grants.

**How worker time is measured.** ``bench.llm`` returns when its body started and ended
(``time.time()`` in the pool process that ran it) and that process's pid; a tenant's worker time
in a window is the sum of its bodies' running time clipped to the window. This is what the pool
processes actually spent on each tenant, measured by the processes themselves and not by the
governance layer's own accounting (which charges its estimates and corrects them at settlement):
the bench checks fairness against ground truth. Time a pool process spends between bodies
(Celery's and governance's work around a task, fetching the next message) belongs to no tenant:
it counts as idle in the pool's utilisation ("pool busy": every tenant's bodies over the pool's
processes, from A's first call's start to its last one's, when A's wait list emptied), so that
figure is a strict one.
Results are read from the result backend (the bench polls it; times come from the results, not
from when they are seen).

Run: ``python -m governance.bench.fair_bench [--only 1 3] [--flood 200 2000] ...`` (``make bench``
runs it with the defaults, about 9 minutes on 2 cores); ``--quick`` is a small scale of every
scenario (about 2 minutes). Figures go to ``--json`` (``bench-results-fair.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import redis
import yaml
from celery import Celery
from celery.states import READY_STATES

from governance.bench.bench_app import LLM_TASK
from governance.bench.celery_bench import (
    SCRIPTS,
    BenchWorker,
    ServerCounters,
    _redis_base_url,
    bench_env,
    publisher_app,
)
from governance.integration import governance_context
from governance.policy.context import ActionContext
from governance.policy.fairness import FairShare, in_flight_bound
from governance.store import StateStore
from governance.store.keys import PoolKeys, TenantKeys
from governance.store.pool import Pools

QUEUE = "celery"
A, B = "fair-a", "fair-b"
WEIGHTS = {"fair-w1": 1, "fair-w2": 2, "fair-w4": 4}
WARM = "fair-warm"
TENANT_CONCURRENCY = 8
POLICY: dict[str, Any] = {
    "version": 1,
    "providers": {
        "fake": {"models": {"fake-small": {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5}}}
    },
    "defaults": {
        "tiers": {"default": "act_auto"},
        "allowed_providers": ["fake"],
        "concurrency": TENANT_CONCURRENCY,
        "long_running": "disabled",
        "max_wait": "2h",
    },
    "tenants": {
        A: {},
        B: {},
        WARM: {},
        **{name: {"weight": weight} for name, weight in WEIGHTS.items()},
    },
}
#: Calls of the warm-up tenant before each run: every pool process has run a governed task.
WARM_UP_CALLS, WARM_UP_MS = 8, 20
#: The broker's queue is sampled this often.
SAMPLE_EVERY_S = 0.02
#: The worker's prefetch (bench_app: worker_prefetch_multiplier=1).
PREFETCH = 1
#: Kombu's Redis transport: a queue is one list per priority step.
_PRIORITY_KEYS = (QUEUE, *(f"{QUEUE}\x06\x16{p}" for p in (3, 6, 9)))


# -- publishing: one process per tenant --------------------------------------------------------


@dataclass(frozen=True)
class Flood:
    """``calls`` calls of ``task_ms`` each by ``tenant``, published from ``at_s`` after the
    run's start; with ``spread``, over that many agents and as many runs (else one of each)."""

    tenant: str
    calls: int
    task_ms: int
    at_s: float = 0.0
    spread: int = 0


@dataclass(frozen=True)
class Published:
    """What a publisher process sent: its task ids, when it began and when it was done."""

    flood: Flood
    ids: tuple[str, ...]
    first_s: float
    last_s: float


def _publisher(env: Mapping[str, str], flood: Flood, conn: Connection) -> None:
    """A publisher process: connects, says it is ready, waits for the run's start (epoch
    seconds), then publishes its flood and sends back what it published."""
    app = publisher_app(env)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=5)
        conn.send("ready")
        start = float(conn.recv())
        task = app.tasks[LLM_TASK]
        messages = [{"role": "user", "content": f"[[sleep {flood.task_ms}]] {flood.tenant}"}]
        kwargs = {"provider": "fake", "model": "fake-small", "messages": messages, "max_tokens": 8}
        time.sleep(max(0.0, start + flood.at_s - time.time()))
        first = time.time()
        ids: list[str] = []
        for i in range(flood.calls):
            agent, run = (
                (f"agent-{i % flood.spread}", f"run-{i % flood.spread}")
                if flood.spread
                else ("agent", f"run-{flood.tenant}")
            )
            with governance_context(ActionContext(tenant=flood.tenant, agent=agent, run=run)):
                ids.append(task.apply_async(kwargs=kwargs).id)
        conn.send(Published(flood, tuple(ids), first, time.time()))
    finally:
        app.close()


class Publishers:
    """Publisher processes, started at once (each one spawns, imports and connects): once
    :meth:`ready`, each is given the run's start time and publishes its flood from its own
    offset."""

    def __init__(self, env: Mapping[str, str], floods: Sequence[Flood]) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[Any] = []
        for flood in floods:
            parent, child = context.Pipe()
            process = context.Process(
                target=_publisher, args=(dict(env), flood, child), daemon=True
            )
            process.start()
            self._pipes.append(parent)
            self._processes.append(process)

    def ready(self, timeout_s: float = 120.0) -> None:
        for pipe in self._pipes:
            if not pipe.poll(timeout_s) or pipe.recv() != "ready":
                raise RuntimeError("a publisher process did not start")

    def go(self, start: float) -> None:
        for pipe in self._pipes:
            pipe.send(start)

    def published(self, timeout_s: float = 900.0) -> list[Published]:
        out: list[Published] = []
        for pipe in self._pipes:
            if not pipe.poll(timeout_s):
                raise RuntimeError("a publisher process did not finish publishing")
            out.append(pipe.recv())
        for process in self._processes:
            process.join(30)
        return out

    def kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()


# -- reading the results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call's outcome: its state, when its result was stored, when its body ran and where."""

    tenant: str
    state: str
    done: float
    started: float | None = None
    ended: float | None = None
    pid: int | None = None

    @property
    def ran(self) -> bool:
        return self.started is not None and self.ended is not None


def _epoch(date_done: Any) -> float:
    if not date_done:
        return time.time()
    when = datetime.fromisoformat(str(date_done))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _ready(app: Celery, pending: Mapping[str, str]) -> dict[str, Call]:
    """The calls among ``pending`` (task id -> tenant) that are done (one read per 1,000)."""
    backend = app.backend
    ids = list(pending)
    ready: dict[str, Call] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        values = backend.client.mget([backend.get_key_for_task(i) for i in chunk])
        for task_id, raw in zip(chunk, values, strict=True):
            if raw is None:
                continue
            meta = backend.decode_result(raw)
            if meta.get("status") not in READY_STATES:
                continue
            result = meta.get("result")
            body = result if isinstance(result, dict) else {}
            ready[task_id] = Call(
                pending[task_id],
                str(meta["status"]),
                _epoch(meta.get("date_done")),
                body.get("started"),
                body.get("ended"),
                body.get("pid"),
            )
    return ready


def collect(
    app: Celery,
    published: Iterable[Published],
    timeout_s: float,
    tenants: Iterable[str] | None = None,
) -> list[Call]:
    """Wait until the calls of ``tenants`` (default: all) are done, reading the result backend
    (a poll of the pending ones, every 0.1 s while few remain, else every second)."""
    wanted = set(tenants) if tenants is not None else None
    pending = {
        task_id: p.flood.tenant
        for p in published
        if wanted is None or p.flood.tenant in wanted
        for task_id in p.ids
    }
    calls: list[Call] = []
    deadline = time.monotonic() + timeout_s
    while pending:
        for task_id, call in _ready(app, pending).items():
            del pending[task_id]
            calls.append(call)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} calls not done after {timeout_s:.0f} s")
        time.sleep(0.1 if len(pending) <= 50 else 1.0)
    return calls


def collect_ready(app: Celery, published: Iterable[Published]) -> list[Call]:
    """The calls done so far (one read; the others are left to run)."""
    pending = {task_id: p.flood.tenant for p in published for task_id in p.ids}
    return list(_ready(app, pending).values())


def of(calls: Iterable[Call], tenant: str) -> list[Call]:
    return [c for c in calls if c.tenant == tenant]


def worker_s(calls: Iterable[Call], lo: float, hi: float) -> dict[str, float]:
    """Each tenant's worker time (s) between ``lo`` and ``hi``: its bodies clipped to them."""
    used: dict[str, float] = {}
    for call in calls:
        if call.started is None or call.ended is None:
            continue
        overlap = min(call.ended, hi) - max(call.started, lo)
        if overlap > 0:
            used[call.tenant] = used.get(call.tenant, 0.0) + overlap
    return used


# -- the broker's queue, sampled ---------------------------------------------------------------


class BrokerSampler(threading.Thread):
    """Samples, every ``SAMPLE_EVERY_S``, the messages ready in the Celery queue (``LLEN``),
    those delivered to the worker and not acknowledged yet, and the pool's grants in flight."""

    def __init__(self, broker_url: str, state_url: str) -> None:
        super().__init__(daemon=True, name="broker-sampler")
        self._broker = redis.Redis.from_url(broker_url)
        self._state = redis.Redis.from_url(state_url)
        self._halt = threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []
        #: The commands this sampler sent (left out of the Redis work per task).
        self.commands: Counter[str] = Counter()

    def run(self) -> None:
        grants = PoolKeys(QUEUE).grants
        while not self._halt.is_set():
            pipe = self._broker.pipeline(transaction=False)
            for key in _PRIORITY_KEYS:
                pipe.llen(key)
            pipe.hlen("unacked")
            *lengths, unacked = pipe.execute()
            in_flight = int(self._state.zcard(grants))
            self.commands.update(llen=len(_PRIORITY_KEYS), hlen=1, zcard=1)
            self.samples.append((time.time(), sum(lengths), int(unacked), in_flight))
            self._halt.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)
        self._broker.close()
        self._state.close()

    def figures(self, lo: float, hi: float) -> dict[str, Any]:
        window = [s for s in self.samples if lo <= s[0] <= hi]
        if not window:
            return {"samples": 0}
        top = max(window, key=lambda s: s[1])
        figures: dict[str, Any] = {
            "samples": len(window),
            "max_queue_length": top[1],
            "max_queue_length_at_s": round(top[0] - lo, 2),
            "max_unacked": max(s[2] for s in window),
            "max_in_broker_or_unacked": max(s[1] + s[2] for s in window),
            "max_grants_in_flight": max(s[3] for s in window),
        }
        # Once the pool dispatches (its first grant): what it keeps within its bound.
        dispatching = next((i for i, s in enumerate(window) if s[3] > 0), None)
        if dispatching is not None:
            since = window[dispatching:]
            figures["pool_dispatching_from_s"] = round(since[0][0] - lo, 2)
            figures["max_queue_length_dispatching"] = max(s[1] for s in since)
        return figures


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run gives: the calls, what each publisher sent, the broker's samples, the
    Redis work done meanwhile, and the pool's capacity."""

    published: list[Published]
    calls: list[Call]
    start: float
    capacity: int
    broker: dict[str, Any]
    by_command: dict[str, int]
    audit_entries: int

    def first_published(self, tenant: str) -> float:
        return min(p.first_s for p in self.published if p.flood.tenant == tenant)

    def tasks(self) -> int:
        return sum(len(p.ids) for p in self.published)

    def redis_per_task(self) -> dict[str, float]:
        tasks = max(1, self.tasks())
        scripts = sum(self.by_command.get(name, 0) for name in SCRIPTS)
        return {
            "script_calls_per_task": round(scripts / tasks, 2),
            "redis_commands_per_task": round(sum(self.by_command.values()) / tasks, 1),
            "broker_messages_per_task": round(self.by_command.get("lpush", 0) / tasks, 2),
            "audit_entries_per_task": round(self.audit_entries / tasks, 2),
        }


@dataclass
class Bench:
    """The Redis, the worker (a new one for each run) and the publishers' environment."""

    env: dict[str, str]
    tmp: Path
    concurrency: int
    app: Celery
    broker: redis.Redis
    state: redis.Redis
    worker: BenchWorker | None = None
    runs: int = field(default=0)

    def fresh(self) -> None:
        """Empty databases and a new worker, its capacity heartbeating in the pool."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.broker.flushdb()
        self.state.flushdb()
        self.runs += 1
        self.worker = BenchWorker(self.env, self.tmp / f"worker-{self.runs}.log", self.concurrency)
        self.worker.start(self.app)
        pools = Pools(StateStore(self.state))
        deadline = time.monotonic() + 30
        while pools.state(QUEUE).capacity != self.concurrency:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker's pool size never reached the pool's capacity")
            time.sleep(0.1)

    def run(
        self,
        floods: Sequence[Flood],
        *,
        wait_for: Iterable[str] | None = None,
        until_s: float | None = None,
        timeout_s: float = 900.0,
    ) -> Run:
        """A fresh worker, a warm-up, then ``floods`` from one start time, on an idle pool;
        returns once the calls of ``wait_for`` (default: every tenant) are done, or, with
        ``until_s``, that long after the start with the calls done by then."""
        self.fresh()
        warm = Publishers(self.env, [Flood(WARM, WARM_UP_CALLS, WARM_UP_MS)])
        publishers = Publishers(self.env, floods)
        sampler = BrokerSampler(self.env["GOVERNANCE_BROKER_URL"], self.state_url)
        try:
            warm.ready()
            warm.go(time.time())
            collect(self.app, warm.published(), timeout_s=60)
            publishers.ready()
            self._idle_pool()
            before = ServerCounters.read(self.broker)
            audit_before = self._audit_entries(floods)
            sampler.start()
            start = time.time() + 0.2
            publishers.go(start)
            published = publishers.published(timeout_s)
            if until_s is None:
                calls = collect(self.app, published, timeout_s, tenants=wait_for)
            else:
                time.sleep(max(0.0, start + until_s - time.time()))
                calls = collect_ready(self.app, published)
            by_command = ServerCounters.read(self.broker).since(before)
            audit_entries = self._audit_entries(floods) - audit_before
        finally:
            warm.kill()
            publishers.kill()
            sampler.stop()
        for name, sent in sampler.commands.items():
            by_command[name] = max(0, by_command.get(name, 0) - sent)
        by_command.pop("mget", None)  # the bench's own reading of the results
        end = max((c.done for c in calls), default=time.time())
        return Run(
            published,
            calls,
            start,
            Pools(StateStore(self.state)).state(QUEUE).capacity,
            sampler.figures(start, end),
            by_command,
            audit_entries,
        )

    def _idle_pool(self, timeout_s: float = 30.0) -> None:
        """Until the pool no longer says it is saturated: a warm-up whose first deliveries
        waited in the broker saturates it for a while (``BACKLOG_HOLD_MS`` in
        ``pool_dispatch.lua``), and each run starts from an idle pool, as after a quiet time."""
        pools = Pools(StateStore(self.state))
        deadline = time.monotonic() + timeout_s
        while pools.saturated([QUEUE])[QUEUE]:
            if time.monotonic() > deadline:
                raise RuntimeError("the pool stayed saturated after the warm-up")
            time.sleep(0.1)

    @property
    def state_url(self) -> str:
        return self.env["GOVERNANCE_STATE_REDIS_URL"]

    def _audit_entries(self, floods: Sequence[Flood]) -> int:
        tenants = {f.tenant for f in floods}
        return sum(int(self.state.hget(TenantKeys(t).meta, "audit_seq") or 0) for t in tenants)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()


# -- the scenarios -----------------------------------------------------------------------------


def _done_after(calls: Sequence[Call], since: float) -> float:
    return max(c.done for c in calls) - since


def _failed(calls: Iterable[Call]) -> int:
    return sum(c.state != "SUCCESS" for c in calls)


def behind_a_flood(
    bench: Bench, flood: int, args: argparse.Namespace, spread: int = 0, drain: bool = True
) -> dict[str, Any]:
    """Scenario 1 (and 2, with ``spread``): B's 10 calls alone (``flood`` 0) or behind A's."""
    task_ms = args.task_ms
    floods = [Flood(B, args.b_calls, task_ms, at_s=args.delay_s if flood else 0.0)]
    if flood:
        floods.insert(0, Flood(A, flood, task_ms, spread=spread))
    run = bench.run(floods, wait_for=None if drain else [B])
    b_calls = of(run.calls, B)
    b_s = _done_after(b_calls, run.first_published(B))
    b_ideal = args.b_calls * task_ms / 1000 / 2
    row: dict[str, Any] = {
        "flood": flood,
        "spread_over": spread or None,
        "b_calls": args.b_calls,
        "b_last_done_s": round(b_s, 2),
        "b_fair_ideal_s": b_ideal,
        "b_to_ideal": round(b_s / b_ideal, 2),
        "b_median_done_s": round(
            sorted(c.done - run.first_published(B) for c in b_calls)[len(b_calls) // 2], 2
        ),
        "b_failed": _failed(b_calls),
        "capacity": run.capacity,
        "broker": run.broker,
        "broker_bound": in_flight_bound(run.capacity, PREFETCH, args.slack_ms, task_ms),
    }
    if flood:
        a_calls = of(run.calls, A)
        row["a_published_in_s"] = round(
            next(p.last_s - p.first_s for p in run.published if p.flood.tenant == A), 2
        )
        if drain:
            a_s = _done_after(a_calls, run.first_published(A))
            a_ideal = (flood + args.b_calls) * task_ms / 1000 / run.capacity
            row.update(
                a_drain_s=round(a_s, 2),
                a_ideal_s=a_ideal,
                a_to_ideal=round(a_s / a_ideal, 4),
                a_failed=_failed(a_calls),
                utilisation_while_a_waits=utilisation(run.calls, A, run.capacity),
            )
    if drain:
        row.update(run.redis_per_task())
    return row


def utilisation(calls: Sequence[Call], tenant: str, capacity: int) -> float:
    """The pool's busy share while ``tenant`` had tasks waiting: from its first call's start to
    its last call's start (the last one left the wait list), every tenant's bodies counted."""
    mine = [c for c in calls if c.tenant == tenant and c.started is not None]
    lo = min(c.started for c in mine if c.started is not None)
    hi = max(c.started for c in mine if c.started is not None)
    if hi <= lo:
        return 0.0
    busy = sum(worker_s(calls, lo, hi).values())
    return round(busy / (capacity * (hi - lo)), 4)


#: Scenario 3 also reports the shares without the first calls: what the broker held before the
#: pool saturated ran first come, first served.
WEIGHTS_SETTLED_AFTER = 100


def weights(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 3: weights 1, 2, 4, all backlogged, equal calls: shares of worker time over the
    first ``--weights-dispatches`` calls to start (and without their first 100)."""
    dispatches, task_ms = args.weights_dispatches, args.weights_task_ms
    total_weight = sum(WEIGHTS.values())
    # Each tenant gets a third more calls than its share of the window: all stay backlogged.
    floods = [
        Flood(t, math.ceil(dispatches * w / total_weight * 4 / 3) + TENANT_CONCURRENCY, task_ms)
        for t, w in WEIGHTS.items()
    ]
    run = bench.run(floods)
    started = sorted((c for c in run.calls if c.started is not None), key=lambda c: c.started or 0)
    window = started[:dispatches]
    backlogged = all(any(c.tenant == t for c in started[dispatches:]) for t in WEIGHTS)
    first, last = window[0].started or 0.0, window[-1].started or 0.0

    def shares(calls: Sequence[Call]) -> dict[str, dict[str, Any]]:
        used = {t: 0.0 for t in WEIGHTS}
        for call in calls:
            used[call.tenant] += (call.ended or 0.0) - (call.started or 0.0)
        total = sum(used.values())
        return {
            t: {
                "weight": w,
                "calls": sum(c.tenant == t for c in calls),
                "share": round(used[t] / total, 4),
                "ideal": round(w / total_weight, 4),
                "relative_error": round((used[t] / total) / (w / total_weight) - 1, 4),
            }
            for t, w in WEIGHTS.items()
        }

    return {
        "dispatches": dispatches,
        "task_ms": task_ms,
        "window_s": round(last - first, 2),
        "all_backlogged_throughout": backlogged,
        "failed": _failed(run.calls),
        "tenants": shares(window),
        "settled_after": WEIGHTS_SETTLED_AFTER,
        "tenants_settled": shares(window[WEIGHTS_SETTLED_AFTER:]),
        "calls_per_100": [
            dict(Counter(c.tenant for c in window[i : i + 100])) for i in range(0, len(window), 100)
        ],
        "broker": run.broker,
    }


def long_and_short(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 4: A's calls take ``--long-ms``, B's ``--short-ms``, equal weights, both
    backlogged: shares of worker time over the window from their first publication."""
    window_s, long_ms, short_ms = args.share_window_s, args.long_ms, args.short_ms
    # Half again what half the pool runs in the window, plus what fills the broker first.
    calls = {
        A: math.ceil(window_s * 1000 * args.concurrency / 2 / long_ms * 1.5) + 8,
        B: math.ceil(window_s * 1000 * args.concurrency / 2 / short_ms * 1.5) + 8,
    }
    run = bench.run(
        [Flood(A, calls[A], long_ms), Flood(B, calls[B], short_ms)],
        until_s=window_s + max(long_ms, short_ms) / 1000 + 1,
    )
    lo = min(run.first_published(A), run.first_published(B))
    used = worker_s(run.calls, lo, lo + window_s)
    total = sum(used.values())
    started_in_window = Counter(
        c.tenant for c in run.calls if c.started is not None and c.started < lo + window_s
    )
    return {
        "window_s": window_s,
        "long_ms": long_ms,
        "short_ms": short_ms,
        "capacity": run.capacity,
        "utilisation": round(total / (run.capacity * window_s), 4),
        # Each still had calls left to start when the window ended.
        "backlogged_throughout": all(started_in_window[t] < calls[t] for t in (A, B)),
        "tenants": {
            t: {
                "call_ms": ms,
                "worker_s": round(used.get(t, 0.0), 2),
                "share": round(used.get(t, 0.0) / total, 4) if total else 0.0,
                "calls_started": started_in_window[t],
            }
            for t, ms in ((A, long_ms), (B, short_ms))
        },
        "failed": _failed(run.calls),
        "broker": run.broker,
    }


def alone(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 5: A alone, concurrency 8 over a pool of 4: utilisation while A waits."""
    calls, task_ms = args.alone_calls, args.task_ms
    run = bench.run([Flood(A, calls, task_ms)])
    a_s = _done_after(run.calls, run.first_published(A))
    ideal = calls * task_ms / 1000 / run.capacity
    return {
        "calls": calls,
        "task_ms": task_ms,
        "capacity": run.capacity,
        "utilisation_while_a_waits": utilisation(run.calls, A, run.capacity),
        "a_drain_s": round(a_s, 2),
        "a_ideal_s": ideal,
        "a_to_ideal": round(a_s / ideal, 4),
        "failed": _failed(run.calls),
        "broker": run.broker,
        "broker_bound": in_flight_bound(run.capacity, PREFETCH, args.slack_ms, task_ms),
    }


# -- the report --------------------------------------------------------------------------------


def report(result: Mapping[str, Any], out: TextIO = sys.stdout) -> None:
    """The figures of each scenario run, one block each."""
    print(
        f"Fair dispatch benchmark: one worker (prefork, {result['concurrency']} processes), "
        "one Redis, this machine",
        file=out,
    )
    if rows := result.get("behind_a_flood"):
        _report_flood(rows, result.get("spread"), out)
    if (spread := result.get("spread")) and not result.get("behind_a_flood"):
        _report_flood([], spread, out)
    if w := result.get("weights"):
        print(
            f"3. weights 1, 2, 4, all backlogged, {w['task_ms']} ms calls: shares of worker time "
            f"over the first {w['dispatches']:,} calls ({w['window_s']} s; all backlogged "
            f"throughout: {w['all_backlogged_throughout']}; failed: {w['failed']})",
            file=out,
        )
        settled = w["tenants_settled"]
        for tenant, row in w["tenants"].items():
            later = settled[tenant]
            print(
                f"   {tenant} (weight {row['weight']}): {row['share']:.4f} against "
                f"{row['ideal']:.4f} ({row['relative_error']:+.1%} relative; {row['calls']} calls)"
                f"; without the first {w['settled_after']} calls {later['share']:.4f} "
                f"({later['relative_error']:+.1%})",
                file=out,
            )
    if s := result.get("long_and_short"):
        print(
            f"4. {s['long_ms']} ms calls (A) against {s['short_ms']} ms calls (B), equal weights, "
            f"both backlogged: shares of worker time over {s['window_s']} s from publication, "
            f"warm-up included (pool busy {s['utilisation']:.1%}; backlogged throughout: "
            f"{s['backlogged_throughout']})",
            file=out,
        )
        for tenant, row in s["tenants"].items():
            print(
                f"   {tenant} ({row['call_ms']} ms calls): {row['share']:.1%} of "
                f"{sum(r['worker_s'] for r in s['tenants'].values()):.1f} s "
                f"({row['calls_started']} calls started)",
                file=out,
            )
    if a := result.get("alone"):
        print(
            f"5. A alone ({a['calls']} calls of {a['task_ms']} ms, concurrency "
            f"{TENANT_CONCURRENCY} over a pool of {a['capacity']}): pool busy "
            f"{a['utilisation_while_a_waits']:.2%} while A waits; drained in {a['a_drain_s']} s "
            f"against {a['a_ideal_s']} s ({a['a_to_ideal']}x)",
            file=out,
        )


def _report_flood(
    rows: Sequence[Mapping[str, Any]], spread: Mapping[str, Any] | None, out: TextIO
) -> None:
    first = rows[0] if rows else spread
    assert first is not None
    print(
        f"1. tenant B's {first['b_calls']} calls "
        f"behind tenant A's flood (fair ideal for B {first['b_fair_ideal_s']} s: half the pool)",
        file=out,
    )
    header = (
        f"   {'A flood':>16} | {'B last done':>16} | {'A drained':>18} | {'pool busy':>9} | "
        f"{'broker queue':>14} | {'scripts':>7} | {'cmds':>5} | {'audit':>5} | failed"
    )
    print(header, file=out)
    for row in [*rows, *([spread] if spread else [])]:
        label = "none (B alone)" if not row["flood"] else f"{row['flood']:,}"
        if row.get("spread_over"):
            label += f" spread {row['spread_over']:,}"
        drained = (
            f"{row['a_drain_s']:.2f} s ({row['a_to_ideal']:.3f}x)" if "a_drain_s" in row else "-"
        )
        busy = (
            f"{row['utilisation_while_a_waits']:.2%}" if "utilisation_while_a_waits" in row else "-"
        )
        broker = row["broker"]
        queue = f"{broker.get('max_queue_length', '-')}"
        if "max_queue_length_dispatching" in broker:
            queue += f" ({broker['max_queue_length_dispatching']})"
        queue += f" / {row['broker_bound']}"
        failed = row["b_failed"] + row.get("a_failed", 0)
        print(
            f"   {label:>16} | {row['b_last_done_s']:>6.2f} s ({row['b_to_ideal']:.2f}x) | "
            f"{drained:>18} | {busy:>9} | {queue:>14} | "
            f"{row.get('script_calls_per_task', '-'):>7} | "
            f"{row.get('redis_commands_per_task', '-'):>5} | "
            f"{row.get('audit_entries_per_task', '-'):>5} | {failed}",
            file=out,
        )
    print(
        "   (B last done: from B's first publication, x its fair ideal; A drained: from A's first "
        "publication, x (A's + B's calls) x duration / pool; pool busy: while A waits; broker "
        "queue: LLEN of the Celery queue, max sampled (max once the pool dispatches) / the "
        "pool's bound; per task: script calls, Redis commands, audit entries)",
        file=out,
    )


# -- main --------------------------------------------------------------------------------------

SCENARIOS = ("1", "2", "3", "4", "5")
QUICK = {
    "flood": [200],
    "spread_calls": 200,
    "weights_dispatches": 280,
    "share_window_s": 20.0,
    "long_ms": 1000,
    "short_ms": 100,
    "alone_calls": 80,
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="the scenarios to run (the broker's queue, 6, is measured in each)",
    )
    parser.add_argument("--quick", action="store_true", help="a small scale of every scenario")
    parser.add_argument("--concurrency", type=_positive, default=4, help="the pool's processes")
    parser.add_argument("--task-ms", type=_positive, default=500, help="calls of 1, 2 and 5")
    parser.add_argument("--delay-s", type=float, default=3.0, help="when B starts (1, 2)")
    parser.add_argument("--b-calls", type=_positive, default=10, help="B's calls (1, 2)")
    parser.add_argument(
        "--flood", type=_positive, nargs="+", default=[200, 2000], help="A's floods (1)"
    )
    parser.add_argument(
        "--spread-calls", type=_positive, default=2000, help="A's calls, spread (2)"
    )
    parser.add_argument(
        "--drain-spread", action="store_true", help="wait for A's spread flood too (2)"
    )
    parser.add_argument(
        "--weights-dispatches", type=_positive, default=1400, help="calls counted (3)"
    )
    parser.add_argument("--weights-task-ms", type=_positive, default=100, help="calls (3)")
    parser.add_argument("--share-window-s", type=float, default=60.0, help="window (4)")
    parser.add_argument("--long-ms", type=_positive, default=2000, help="A's calls (4)")
    parser.add_argument("--short-ms", type=_positive, default=200, help="B's calls (4)")
    parser.add_argument("--alone-calls", type=_positive, default=240, help="A's calls (5)")
    parser.add_argument("--json", default="bench-results-fair.json", help="where to write JSON")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    args.slack_ms = FairShare().slack_ms
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    result: dict[str, Any] = {"concurrency": args.concurrency, "task_ms": args.task_ms}
    steps: list[tuple[str, str, Callable[[Bench], Any]]] = []
    if "1" in args.only:
        for flood in [0, *args.flood]:
            title = f"B behind a flood of {flood:,}" if flood else "B alone"
            steps.append(("1", title, partial(behind_a_flood, flood=flood, args=args)))
    if "2" in args.only:
        spread = args.spread_calls // 2
        title = f"B behind a flood of {args.spread_calls:,} over {spread:,} agents and runs"
        spread_step = partial(
            behind_a_flood, flood=args.spread_calls, args=args, spread=spread,
            drain=args.drain_spread,
        )  # fmt: skip
        steps.append(("2", title, spread_step))
    if "3" in args.only:
        steps.append(("3", "weights 1, 2, 4", partial(weights, args=args)))
    if "4" in args.only:
        steps.append(("4", "long and short calls", partial(long_and_short, args=args)))
    if "5" in args.only:
        steps.append(("5", "A alone", partial(alone, args=args)))
    keys = {
        "1": "behind_a_flood",
        "2": "spread",
        "3": "weights",
        "4": "long_and_short",
        "5": "alone",
    }
    with (
        tempfile.TemporaryDirectory(prefix="fair-bench-") as tmp,
        _redis_base_url() as (base_url, _external),
    ):
        env = bench_env(base_url, Path(tmp))
        Path(env["GOVERNANCE_CONFIG_PATH"]).write_text(yaml.safe_dump(POLICY), encoding="utf-8")
        broker = redis.Redis.from_url(env["GOVERNANCE_BROKER_URL"])
        state = redis.Redis.from_url(env["GOVERNANCE_STATE_REDIS_URL"])
        app = publisher_app(env)
        bench = Bench(env, Path(tmp), args.concurrency, app, broker, state)
        try:
            for number, title, step in steps:
                print(f"  {number}. {title} ...", flush=True)
                figures = step(bench)
                if number == "1":
                    result.setdefault(keys[number], []).append(figures)
                else:
                    result[keys[number]] = figures
        except KeyboardInterrupt:
            print("interrupted: stopping the worker and Redis", file=sys.stderr)
            return 130
        except Exception:
            if bench.worker is not None:
                print(f"worker log (last lines):\n{bench.worker.log_tail()}", file=sys.stderr)
            raise
        finally:
            bench.close()
            app.close()
            broker.close()
            state.close()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    report(result)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"  written to {args.json} (whole run: {result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
