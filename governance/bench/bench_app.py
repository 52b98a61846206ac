"""The Celery apps of the benchmarks: a governed app, and ungoverned ones to compare it with.

``app`` is governed the way a platform team governs its own app with the library alone (no
example deployment): ``govern(app, settings)``, then ``base=GovernedTask`` on its tasks.
``bench.echo`` is a governed tool call (the policy's ``echo``) returning its argument;
``bench.llm`` a governed LLM call whose body sleeps as long as its first message asks
(``[[sleep MS]]``), reports the tokens of a small completion and returns when its body started
and ended (epoch seconds) and in which pool process, so that a benchmark reads the worker time
each task used from its result. Its tasks go to Celery's default queue (``celery``).

``plain_app`` is the baseline: a second app on which ``govern()`` was never called (so none of
its signal handlers, consumer, publishing wrapper or serializer settings), with the same broker,
result backend and Celery settings (:data:`BENCH_CONF`), its tasks routed to their own queue
(:data:`PLAIN_QUEUE`) so that its own worker serves them. It carries ``bench.noop``, the plain
task (the same argument as ``bench.echo``, nothing done with it), and ``bench.round_trips``, the
yardstick: an ungoverned task that makes the Redis round trips a governed one makes (a
MULTI/EXEC transaction before it is published, as the ledger record; two script calls in the
worker, as admission and settlement) with none of the work: the scripts return at once, no
policy runs, nothing is read or sealed. Its throughput is the most that any design making these
round trips can reach on the machine.

``defaults_app`` carries ``bench.noop`` with Celery's default settings (early acks, the default
prefetch, no ``STARTED`` state, no extended results; the result backend is still set, so that
completion can be awaited), on its own queue (:data:`DEFAULTS_QUEUE`): a reference for what the
benchmark's settings cost by themselves.

``celery -A governance.bench.bench_app worker`` serves ``app``;
``-A governance.bench.bench_app:plain_app -Q bench-plain`` and
``-A governance.bench.bench_app:defaults_app -Q bench-defaults`` the others. Each is built from
the ``GOVERNANCE_*`` variables the benchmark sets when a worker first asks for it, and building
one builds none of the others.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.utils import uuid

from governance.integration import GovernedLLMTask, GovernedTask, govern, report_usage
from governance.policy.usage import Usage
from governance.settings import GovernanceSettings

PLAIN_TASK = "bench.noop"
GOVERNED_TASK = "bench.echo"
LLM_TASK = "bench.llm"
ROUND_TRIPS_TASK = "bench.round_trips"
#: The queues of the ungoverned apps (the governed app keeps Celery's default, ``celery``).
PLAIN_QUEUE = "bench-plain"
DEFAULTS_QUEUE = "bench-defaults"
#: Celery's settings of the governed app and of the plain baseline, as in the example deployment.
BENCH_CONF: dict[str, Any] = {
    "result_extended": True,
    "task_acks_late": True,
    "task_track_started": True,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
}
_SLEEP = re.compile(r"\[\[sleep (\d+)\]\]")


def noop(text: str = "") -> None:
    """The plain task: takes the same argument as ``bench.echo`` and does nothing with it."""


def echo(text: str = "") -> dict[str, str]:
    """The governed tool call: returns its input."""
    return {"text": text}


def llm(
    provider: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """The governed LLM call: sleeps as asked, reports a small completion's tokens; returns
    when its body started and ended (``time.time()``) and the pool process that ran it."""
    started = time.time()
    asked = _SLEEP.search(messages[0]["content"]) if messages else None
    if asked:
        time.sleep(int(asked.group(1)) / 1000)
    report_usage(Usage(input_tokens=4, output_tokens=min(max_tokens, 2)))
    return {"text": "ok", "started": started, "ended": time.time(), "pid": os.getpid()}


class BareRoundTrips:
    """The Redis round trips of a governed task without their work, on the governance Redis.

    The client connects on first use, so a worker's pool processes each open their own after
    the fork.
    """

    #: Admission and settlement: the script calls a governed task makes in the worker.
    SCRIPT_CALLS = 2

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None
        self._script: Any = None

    def _connected(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
            self._script = self._client.register_script("return 1")
        return self._client

    def record(self, task_id: str) -> None:
        """One MULTI/EXEC of the ledger record's shape (a hash and a sorted-set entry)."""
        key = f"bench:round-trips:{task_id}"
        with self._connected().pipeline(transaction=True) as pipe:
            pipe.hset(key, "id", task_id)
            pipe.zadd("bench:round-trips", {key: time.time()})
            pipe.execute()

    def call_scripts(self) -> None:
        """The worker's script calls (``EVALSHA`` of a script that returns at once)."""
        self._connected()
        for _ in range(self.SCRIPT_CALLS):
            self._script()


class RoundTripsTask(Task):  # type: ignore[misc]
    """A plain task that records itself before it is published, as a governed one does."""

    bare: BareRoundTrips

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        task_id = task_id or uuid()
        self.bare.record(task_id)
        return super().apply_async(args, kwargs, task_id=task_id, **options)


def round_trips(self: RoundTripsTask, text: str = "") -> None:
    """The yardstick: the governed task's script calls, no work, then nothing (as ``noop``)."""
    self.bare.call_scripts()


def create_bench_app(settings: GovernanceSettings) -> Celery:
    """The governed benchmark app for ``settings``: :data:`BENCH_CONF`, ``govern()``, and the
    governed tasks ``bench.echo`` and ``bench.llm`` (on Celery's default queue)."""
    app = Celery("bench", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(BENCH_CONF)
    govern(app, settings)
    app.task(name=GOVERNED_TASK, base=GovernedTask, governance_tool="echo", shared=False)(echo)
    app.task(name=LLM_TASK, base=GovernedLLMTask, shared=False)(llm)
    return app


def create_plain_app(settings: GovernanceSettings) -> Celery:
    """The ungoverned baseline for ``settings``: the governed app's broker, result backend and
    Celery settings, without ``govern()``; ``bench.noop`` and the yardstick ``bench.round_trips``
    (on :data:`PLAIN_QUEUE`)."""
    app = Celery("bench-plain", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(
        BENCH_CONF,
        task_routes={name: {"queue": PLAIN_QUEUE} for name in (PLAIN_TASK, ROUND_TRIPS_TASK)},
    )
    app.task(name=PLAIN_TASK, shared=False)(noop)
    app.task(
        name=ROUND_TRIPS_TASK,
        base=RoundTripsTask,
        bind=True,
        bare=BareRoundTrips(settings.state_url),
        shared=False,
    )(round_trips)
    return app


def create_defaults_app(settings: GovernanceSettings) -> Celery:
    """``bench.noop`` with Celery's default settings (on :data:`DEFAULTS_QUEUE`): only the
    broker, the result backend (to await completion) and the retry on startup (which silences a
    deprecation warning, nothing more) are set."""
    app = Celery("bench-defaults", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_routes={PLAIN_TASK: {"queue": DEFAULTS_QUEUE}},
    )
    app.task(name=PLAIN_TASK, shared=False)(noop)
    return app


#: The module's apps, by name, and how each is built.
_BUILDERS = {
    "app": create_bench_app,
    "plain_app": create_plain_app,
    "defaults_app": create_defaults_app,
}
_served: dict[str, Celery] = {}


def __getattr__(name: str) -> Any:
    """``app``, ``plain_app``, ``defaults_app``: a worker's app, built from the environment when
    first asked for (importing this module, or building one of them, builds no other)."""
    build = _BUILDERS.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _served:
        _served[name] = build(GovernanceSettings())
    return _served[name]


__all__ = [
    "BENCH_CONF",
    "DEFAULTS_QUEUE",
    "GOVERNED_TASK",
    "LLM_TASK",
    "PLAIN_QUEUE",
    "PLAIN_TASK",
    "ROUND_TRIPS_TASK",
    "create_bench_app",
    "create_defaults_app",
    "create_plain_app",
]
