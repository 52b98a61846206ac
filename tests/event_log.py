"""An event receiver on a broker, in a thread of the test process: every event a worker,
publisher or ``govctl`` sends (what Flower would see), and a way to wait until a worker's
earlier events have all arrived (its heartbeats follow them on the same connection)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from celery import Celery

from tests.polling import wait_until


class EventLog:
    """Every event on the broker's event exchange, captured by a receiver in a thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def _capture(self) -> None:
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> EventLog:
        """Capture, once the receiver's queue is bound (a probe event of ours came back)."""
        self._thread.start()
        probe = uuid.uuid4().hex

        def probe_seen() -> bool:
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send("probe-sent", probe=probe)
            return any(e.get("probe") == probe for e in self.snapshot())

        wait_until(probe_seen, 20, "the event receiver to be bound", poll_s=0.1)
        return self

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def task_events(self, since: int = 0) -> list[tuple[str, str]]:
        """``(type, uuid)`` of every task event captured after the first ``since`` events."""
        return [
            (str(e["type"]), str(e.get("uuid", "")))
            for e in self.snapshot()[since:]
            if str(e.get("type", "")).startswith("task-")
        ]

    def settled(self, hostname: str) -> None:
        """Wait until everything the worker sent so far has arrived: two more of its heartbeats
        (sent by the same dispatcher, on the same connection, after its task events)."""
        seen = self._heartbeats(hostname)
        wait_until(
            lambda: self._heartbeats(hostname) >= seen + 2,
            20,
            "two more heartbeats of the worker",
        )

    def _heartbeats(self, hostname: str) -> int:
        return sum(
            1
            for e in self.snapshot()
            if e.get("type") == "worker-heartbeat" and e.get("hostname") == hostname
        )
