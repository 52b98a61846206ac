"""The Celery app of the benchmarks: a plain task and governed ones, on one app.

Built the way a platform team governs its own app with the library alone (no example
deployment): ``govern(app, settings)``, then ``base=GovernedTask`` on the governed tasks.
``bench.noop`` is plain; ``bench.echo`` is a governed tool call (the policy's ``echo``) taking
the same argument and returning it; ``bench.llm`` a governed LLM call whose body sleeps as long
as its first message asks (``[[sleep MS]]``), reports the tokens of a small completion and
returns when its body started and ended (epoch seconds) and in which pool process, so that a
benchmark reads the worker time each task used from its result.
Plain and governed tasks so share one broker, one worker, one pool and one configuration; only
governance differs.

``bench.round_trips`` is the yardstick between them: an ungoverned task that makes the Redis
round trips a governed one makes (a MULTI/EXEC transaction before it is published, as the
ledger record; two script calls in the worker, as admission and settlement) with none of the
work: the scripts return at once, no policy runs, nothing is read or sealed. Its throughput is
the most that any design making these round trips can reach on the machine.

``celery -A governance.bench.bench_app worker`` serves ``app``, built from the ``GOVERNANCE_*``
variables the benchmark sets when the worker first asks for it.
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
    """The benchmark app for ``settings``: Celery's settings as in the example deployment."""
    app = Celery("bench", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(
        result_extended=True,
        task_acks_late=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )
    govern(app, settings)
    app.task(name=PLAIN_TASK, shared=False)(noop)
    app.task(name=GOVERNED_TASK, base=GovernedTask, governance_tool="echo", shared=False)(echo)
    app.task(name=LLM_TASK, base=GovernedLLMTask, shared=False)(llm)
    app.task(
        name=ROUND_TRIPS_TASK,
        base=RoundTripsTask,
        bind=True,
        bare=BareRoundTrips(settings.state_url),
        shared=False,
    )(round_trips)
    return app


_served: list[Celery] = []


def __getattr__(name: str) -> Any:
    """``app``: the worker's app, built from the environment when first asked for (importing
    this module for :func:`create_bench_app` builds nothing)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _served:
        _served.append(create_bench_app(GovernanceSettings()))
    return _served[0]


__all__ = ["GOVERNED_TASK", "LLM_TASK", "PLAIN_TASK", "ROUND_TRIPS_TASK", "create_bench_app"]
