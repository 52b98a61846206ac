"""A team's own Celery app, governed by its task class alone (``task_cls=GovernedTask``).

Served by a worker of its own in ``test_e2e_own_tasks.py`` (queue ``own``, so the session's
example-deployment worker never sees these tasks). Broker and results come from
``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``, governance from the ``GOVERNANCE_*`` variables.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from governance.integration import GovernedTask
from governance.policy.errors import ActionError

app = Celery("own", task_cls=GovernedTask)
app.conf.task_default_queue = "own"

# The tests import this module afresh for each broker: ``shared=False`` keeps each import's tasks
# on its own app, not on every app finalized later (a duplicate name there is an error).


@app.task(name="own.upper", shared=False)
def upper(text: str) -> str:
    return text.upper()


@app.task(name="own.count", shared=False)
def count(text: str) -> int:
    return len(text)


@app.task(name="own.secret", shared=False)
def secret(text: str) -> str:
    """Not allowed to the tests' tenant: publishing it is denied."""
    return text


@app.task(name="own.lookup", shared=False)
def lookup(query: str, api_key: str) -> str:
    """Takes a secret-named argument (shadowed for the ``watcher`` agent: it never runs)."""
    return f"{query}: found"


@app.task(name="own.stamp", shared=False)
def stamp(label: str, ms: int) -> dict[str, Any]:
    """Sleeps ``ms``; returns when it ran (wall clock, the same machine for every process)."""
    start = time.time()
    time.sleep(ms / 1000)
    return {"label": label, "start": start, "end": time.time()}


@app.task(name="own.flaky", bind=True, max_retries=2, shared=False)
def flaky(self: Any, failures: int) -> int:
    """Fails (a transient ConnectionError) on its first ``failures`` attempts, via self.retry."""
    if self.request.retries < failures:
        raise self.retry(
            exc=ConnectionError(f"attempt {self.request.retries} failed"), countdown=0.2
        )
    return int(self.request.retries)


@app.task(name="own.giving_up", bind=True, max_retries=1, shared=False)
def giving_up(self: Any) -> None:
    """Always fails with a transient ActionError, via self.retry: one retry (its own
    max_retries), though the tenant's retry policy would allow more."""
    raise self.retry(
        exc=ActionError.transient(f"attempt {self.request.retries} failed"), countdown=0.1
    )


@app.task(
    name="own.auto",
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_backoff=1,
    retry_jitter=False,
    max_retries=2,
    shared=False,
)
def auto(self: Any, failures: int) -> int:
    """The same with ``autoretry_for`` and ``retry_backoff`` (1 s, then 2 s)."""
    if self.request.retries < failures:
        raise ConnectionError(f"attempt {self.request.retries} failed")
    return int(self.request.retries)


@app.task(name="own.stubborn", shared=False)
def stubborn(ms: int) -> str:
    """Ignores its soft time limit (the policy's step timeout) and sleeps on: only the hard
    limit stops it."""
    deadline = time.monotonic() + ms / 1000
    while time.monotonic() < deadline:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(0.05)
    return "finished anyway"
