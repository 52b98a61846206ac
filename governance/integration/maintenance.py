"""The worker's maintenance thread: what must happen even when no task arrives.

Every ``park_poll_s`` it publishes parked tasks that are due; every ``held_sweep_s`` it rejects
held tasks whose hold expired and re-publishes released tasks whose publication was never
confirmed. Every worker runs it; each step is atomic in Redis, so many workers never do the same
work twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from governance.integration.approvals import Approvals
from governance.integration.republish import publish_due_parked
from governance.integration.runtime import GovernanceRuntime
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.maintenance")


class MaintenanceThread:
    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self._app = app
        self._runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="governance-maintenance", daemon=True
        )
        self._next_sweep = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def run_once(self) -> None:
        publish_due_parked(self._app, self._runtime.parking)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self._runtime.settings.held_sweep_s
            approvals = Approvals(self._app, self._runtime)
            approvals.expire_due()
            approvals.republish_unpublished()

    def _loop(self) -> None:
        while not self._stop.wait(self._runtime.settings.park_poll_s):
            try:
                self.run_once()
            except StoreUnavailable as exc:
                log.warning("maintenance skipped a round: %s", exc)
            except Exception:
                log.exception("maintenance failed this round")
