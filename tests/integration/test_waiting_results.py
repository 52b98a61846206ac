"""A waiting state (DEFERRED, HELD) never replaces a task's end in the result backend.

The publisher (or a worker) writes DEFERRED after the admission said the task waits; another
process may hand the task on and run it first. With 50 concurrent MCP calls of a tenant of
concurrency 1, a plain write replaced about one result in five: the caller waited for a SUCCESS
that its backend no longer had. On Celery's Redis backend the write is a WATCH transaction;
here against a real Redis, the worker's write landing between the read and the write.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from governance.integration.waiting_results import FINAL_STATES, store_waiting_state


@pytest.fixture
def app(redis_url: str, redis_client: Any) -> Iterator[Celery]:
    app = Celery("waiting-results", broker=redis_url, backend=redis_url)
    yield app
    app.close()


def test_a_task_with_no_result_yet_shows_it_waits(app: Celery) -> None:
    assert store_waiting_state(app.backend, "t1", "DEFERRED", {"reason": "concurrency 1/1"})
    meta = app.backend.get_task_meta("t1", cache=False)
    assert meta["status"] == "DEFERRED"
    assert meta["result"] == {"reason": "concurrency 1/1"}


@pytest.mark.parametrize("final", ["SUCCESS", "FAILURE", "REVOKED", "DENIED", "SHADOWED"])
def test_an_ended_task_keeps_its_end(app: Celery, final: str) -> None:
    assert final in FINAL_STATES
    result: Any = ValueError("boom") if final in ("FAILURE", "REVOKED") else {"text": "done"}
    app.backend.store_result("t2", result, final)
    assert not store_waiting_state(app.backend, "t2", "DEFERRED", {"reason": "late"})
    assert app.backend.get_task_meta("t2", cache=False)["status"] == final


def test_a_waiting_or_started_task_shows_its_new_wait(app: Celery) -> None:
    """Not an end: a retry's next delivery waits, a held task is released and waits its turn."""
    for before in ("STARTED", "RETRY", "HELD"):
        app.backend.store_result("t3", {}, before)
        assert store_waiting_state(app.backend, "t3", "DEFERRED", {"reason": before})
        assert app.backend.get_task_meta("t3", cache=False)["status"] == "DEFERRED"


def test_a_result_stored_between_the_read_and_the_write_is_kept(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's SUCCESS lands after the waiting write read the key, before it wrote: the
    transaction fails, the next look sees the end, and nothing is written."""
    backend = app.backend
    decode = backend.decode
    landed: list[str] = []

    def read_then_worker_writes(payload: Any) -> Any:
        meta = decode(payload)
        if not landed:  # the first read: a worker stores the task's result now
            landed.append("SUCCESS")
            app.backend.client.set(
                backend.get_key_for_task("t4"),
                backend.encode({"status": "SUCCESS", "result": 42, "task_id": "t4"}),
            )
        return meta

    backend.store_result("t4", {}, "STARTED")
    monkeypatch.setattr(backend, "decode", read_then_worker_writes)
    assert not store_waiting_state(backend, "t4", "DEFERRED", {"reason": "late"})
    monkeypatch.undo()
    meta = backend.get_task_meta("t4", cache=False)
    assert (meta["status"], meta["result"]) == ("SUCCESS", 42)


def test_an_app_without_a_result_backend_writes_nothing() -> None:
    app = Celery("no-results")  # Celery's DisabledBackend: reading a state raises there
    assert not store_waiting_state(app.backend, "t5", "DEFERRED", {"reason": "waits"})
