"""What is RabbitMQ's own: its consumer timeout, and a dead worker's deliveries coming back at once.

RabbitMQ closes the channel of a delivery left unacknowledged longer than ``consumer_timeout``
(the e2e node's is 10 s; production's default is 30 min), and with it the worker (celery #6760).
A governed task that waits, in a wait list or for a long retry, must therefore never wait as an
unacknowledged delivery: these tests wait longer than the timeout and check each task ran once
and the worker lived. They run on the RabbitMQ half of the e2e suite only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery

from governance.integration import governance_context
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from tests.e2e.conftest import E2E_CONSUMER_TIMEOUT_S, WorkerProcess, audit_of, types_of
from tests.e2e.observer import ObserverServer
from workers.api import submit_llm

pytestmark = [pytest.mark.rabbitmq_broker, pytest.mark.timeout(240)]


def _closed_channel(worker: WorkerProcess) -> bool:
    return "PRECONDITION_FAILED" in Path(worker.log_path).read_text(errors="replace")


def test_a_wait_longer_than_the_consumer_timeout_runs_each_task_once(
    app: Celery, runtime: GovernanceRuntime, worker: WorkerProcess, observer: ObserverServer
) -> None:
    """Concurrency 1, four calls of 4 s: the last one waits about 12 s, past the 10 s timeout."""
    url = f"{observer.base_url}/slow?key=rabbit-wait&ms=4000"
    with governance_context(ActionContext(tenant="t-conc", agent="waiter", run="run-rabbit")):
        results = [app.tasks["tools.http_get"].delay(url=url) for _ in range(4)]
    started = time.monotonic()
    for result in results:
        assert result.get(timeout=120)["status"] == 200
    assert time.monotonic() - started > E2E_CONSUMER_TIMEOUT_S  # the wait outlasted it
    assert observer.observations.counts["rabbit-wait"] == 4
    assert observer.observations.max_in_flight["rabbit-wait"] == 1
    for result in results:
        assert types_of(audit_of(runtime, result.id)).count("admitted") == 1
    assert worker.process is not None
    assert worker.process.poll() is None
    assert not _closed_channel(worker)


def test_a_retry_after_longer_than_the_consumer_timeout_runs_once_after_the_wait(
    app: Celery, runtime: GovernanceRuntime, worker: WorkerProcess
) -> None:
    """A provider answers 429 with Retry-After 12 s: the retry is parked, not held unacked."""
    result = submit_llm(
        app,
        ActionContext(tenant="t-retry", agent="agent-1", run="run-rabbit-retry"),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": "[[fail 429 12000 1]] later"}],
        max_tokens=20,
    )
    assert result.get(timeout=90)["text"] == "echo: later"
    entries = audit_of(runtime, result.id)
    starts = [int(e.fields["ts"]) for e in entries if e.fields["type"] == "admitted"]
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 12_000
    assert types_of(entries).count("task_finished") == 1
    assert runtime.ledger.where("t-retry", result.id)["where"] == "done"
    assert worker.process is not None
    assert worker.process.poll() is None
    assert not _closed_channel(worker)
