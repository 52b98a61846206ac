"""The Celery app of the benchmarks: a plain task and governed ones, on one app.

Built the way a platform team governs its own app with the library alone (no example
deployment): ``govern(app, settings)``, then ``base=GovernedTask`` on the governed tasks.
``bench.noop`` is plain; ``bench.echo`` is a governed tool call (the policy's ``echo``) taking
the same argument and returning it; ``bench.llm`` a governed LLM call whose body sleeps as long
as its first message asks (``[[sleep MS]]``) and reports the tokens of a small completion.
Plain and governed tasks so share one broker, one worker, one pool and one configuration; only
governance differs.

``celery -A governance.bench.bench_app worker`` serves ``app``, built from the ``GOVERNANCE_*``
variables the benchmark sets when the worker first asks for it.
"""

from __future__ import annotations

import re
import time
from typing import Any

from celery import Celery

from governance.integration import GovernedLLMTask, GovernedTask, govern, report_usage
from governance.policy.usage import Usage
from governance.settings import GovernanceSettings

PLAIN_TASK = "bench.noop"
GOVERNED_TASK = "bench.echo"
LLM_TASK = "bench.llm"
_SLEEP = re.compile(r"\[\[sleep (\d+)\]\]")


def noop(text: str = "") -> None:
    """The plain task: takes the same argument as ``bench.echo`` and does nothing with it."""


def echo(text: str = "") -> dict[str, str]:
    """The governed tool call: returns its input."""
    return {"text": text}


def llm(provider: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The governed LLM call: sleeps as asked, reports a small completion's tokens."""
    asked = _SLEEP.search(messages[0]["content"]) if messages else None
    if asked:
        time.sleep(int(asked.group(1)) / 1000)
    report_usage(Usage(input_tokens=4, output_tokens=min(max_tokens, 2)))
    return "ok"


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


__all__ = ["GOVERNED_TASK", "LLM_TASK", "PLAIN_TASK", "create_bench_app"]
