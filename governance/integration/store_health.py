"""Whether the state store answers, as one process sees it, and what follows from an outage.

Every store call of a process goes through :meth:`StoreHealth.call`, which notes whether the
store answered. Right after an outage every lease looks expired, though the workers that hold
them were only cut off: for a lease period after the store is back, this process takes no lease
from its holder (:attr:`StoreHealth.may_reclaim`), so they can renew (or settle) first. The lease
thread probes the store every half heartbeat (:meth:`StoreHealth.probe`), so an idle process
learns of an outage too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance")


class StoreHealth:
    """The outages of the state store seen by this process."""

    def __init__(self, lease_s: float, heartbeat_s: float) -> None:
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        #: When the state store last came back after being unreachable (monotonic seconds).
        self._recovered_at: float | None = None
        self._down_since: float | None = None
        self._probed_at = 0.0

    def failed(self) -> None:
        """Note that the state store could not be reached."""
        if self._down_since is None:
            self._down_since = time.monotonic()

    def answered(self) -> None:
        """Note that the state store answered (after an outage, start the grace period)."""
        if self._down_since is not None:
            self._down_since = None
            self._recovered_at = time.monotonic()

    @contextmanager
    def call(self) -> Iterator[None]:
        """Track whether the state store answers the calls made inside the block."""
        try:
            yield
        except StoreUnavailable:
            self.failed()
            raise
        self.answered()

    def probe(self, ping: Callable[[], object]) -> None:
        """``ping`` the store, at most every half heartbeat: a process then learns of an outage
        long enough to expire leases even if it made no call meanwhile, so its first admission
        or settlement after the outage does not take the leases of workers that were only cut
        off (see :attr:`may_reclaim`)."""
        now = time.monotonic()
        if now - self._probed_at < self._heartbeat_s / 2:
            return
        self._probed_at = now
        try:
            with self.call():
                ping()
        except StoreUnavailable as exc:
            log.debug("the state store does not answer: %s", exc)

    @property
    def may_reclaim(self) -> bool:
        """Whether leases that expired may be taken from their holders now (not during an
        outage, nor for a lease period and a heartbeat after it)."""
        if self._down_since is not None:
            return False
        if self._recovered_at is None:
            return True
        return time.monotonic() - self._recovered_at > self._lease_s + self._heartbeat_s
