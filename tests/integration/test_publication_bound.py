"""What a publisher sends to the broker while the pool is not saturated (fair dispatch).

A tenant's tasks go to the broker until that tenant alone has more in flight (in the broker or
running) than the pool keeps there: its capacity plus the prefetch, or the slack's worth of the
tenant's estimated work per pool process, whichever is more. The next one waits for the pool
from publication. Short tasks (a known mean run time of a few milliseconds) stay on the hot path
however many are in flight; long ones or unknown ones wait past capacity plus prefetch.

Publisher only (no worker), on the test run's real Redis as broker, results and state: what
reached the broker is read from the queue itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from governance.integration import governance_context, runtime_for
from governance.policy.context import ActionContext
from governance.store.keys import PoolKeys
from tests.integration.apps import governed_app

QUEUE_UNKNOWN = f"bound-unknown-{uuid.uuid4().hex[:8]}"
QUEUE_SHORT = f"bound-short-{uuid.uuid4().hex[:8]}"
#: The pool's capacity on each queue (set in the policy: no worker runs here).
CAPACITY = 2

POLICY = f"""
version: 1
tools:
  bound.echo: compute
defaults:
  long_running: disabled
fairness:
  capacity: {{{QUEUE_UNKNOWN}: {CAPACITY}, {QUEUE_SHORT}: {CAPACITY}}}
tenants:
  fresh:
    allowed_tools: [bound.echo]
    concurrency: 50
  quick:
    allowed_tools: [bound.echo]
    concurrency: 50
"""


@pytest.fixture(scope="module")
def app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    app = governed_app("bound", POLICY, tmp_path_factory, broker_url=redis_url)

    @app.task(name="bound.echo", shared=False)
    def echo(text: str) -> str:
        return text

    yield app
    app.close()


def publish(app: Celery, tenant: str, queue: str, count: int) -> list[Any]:
    with governance_context(ActionContext(tenant=tenant, agent="agent", run="run-bound")):
        return [app.tasks["bound.echo"].apply_async(("x",), queue=queue) for _ in range(count)]


def in_broker(redis_url: str, queue: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.llen(queue))


def test_a_tenant_with_no_history_waits_for_the_pool_past_capacity_plus_prefetch(
    app: Celery, redis_url: str
) -> None:
    """No mean run time yet: the default estimate (1 s) makes the slack worth less than a task,
    so the bound is the capacity plus one prefetched task per process: 4 here."""
    results = publish(app, "fresh", QUEUE_UNKNOWN, 6)
    assert in_broker(redis_url, QUEUE_UNKNOWN) == 2 * CAPACITY
    assert [r.state for r in results[2 * CAPACITY :]] == ["DEFERRED", "DEFERRED"]


def test_a_tenant_of_short_tasks_stays_on_the_hot_path_well_past_capacity(
    app: Celery, redis_url: str
) -> None:
    """A mean run time of 2 ms: 100 ms of slack per process is 50 tasks each, so a stream with
    many in flight (a paced publisher, short calls) still goes straight to the broker."""
    runtime = runtime_for(app)
    runtime.state.client.hset(PoolKeys(QUEUE_SHORT).tenants, "quick:ms", "2")
    results = publish(app, "quick", QUEUE_SHORT, 30)
    assert in_broker(redis_url, QUEUE_SHORT) == 30
    assert {r.state for r in results} == {"PENDING"}
