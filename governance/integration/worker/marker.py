"""Every worker marks the state Redis as its deployment's: when it starts, then every
:func:`refresh_s` while it runs (:mod:`governance.store.deployment`).

``govctl`` refuses to answer from a Redis without the mark (the broker's database 0, say,
when ``GOVERNANCE_STATE_REDIS_URL`` was left unset), instead of printing an empty listing.
Refreshing it keeps it there after the state was flushed (tests do), and says when a worker
last ran. A failure to write it is only logged at debug level: an outage is reported elsewhere.
"""

from __future__ import annotations

import logging
import threading

from governance import forksafe
from governance.integration.runtime import GovernanceRuntime
from governance.settings import GovernanceSettings
from governance.store.deployment import write_marker
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.marker")

#: The longest a worker waits between two writes of the marker.
MAX_REFRESH_S = 5.0


def refresh_s(settings: GovernanceSettings) -> float:
    """How often a worker writes the marker: half a heartbeat, between 0.25 s and 5 s (govctl,
    finding none, waits as long for one before it refuses)."""
    return min(MAX_REFRESH_S, max(0.25, settings.heartbeat_interval_s / 2))


class MarkerKeeper:
    """Writes the deployment marker as ``node`` now, and again every :func:`refresh_s`."""

    def __init__(self, runtime: GovernanceRuntime, node: str) -> None:
        self._runtime = runtime
        self._node = node
        self._every_s = refresh_s(runtime.settings)
        self._stop = forksafe.event()
        self._thread = threading.Thread(target=self._loop, name="governance-marker", daemon=True)

    def start(self) -> None:
        self._write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._every_s + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self._write()

    def _write(self) -> None:
        try:
            write_marker(self._runtime.state, self._node)
        except StoreUnavailable as exc:
            log.debug("the deployment marker waits for the state store: %s", exc)
