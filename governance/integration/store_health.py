"""Whether the state store answers, as one process sees it, and what follows from an outage.

Every store call of a process goes through :meth:`StoreHealth.call`, which notes whether the
store answered. Right after an outage every lease looks expired, though the workers that hold
them were only cut off: for a lease period after the store is back, this process takes no lease
from its holder (:attr:`StoreHealth.may_reclaim`), so they can renew (or settle) first. The lease
thread probes the store every half heartbeat (:meth:`StoreHealth.probe`), so an idle process
learns of an outage too.

**What an outage logs.** Every thread that meets an outage would say so at each of its rounds
(the maintenance thread twice a second, the notifier once a second, each delivery sent back to
the broker). :data:`OUTAGE_LOG`, a filter on the worker's log handlers (installed by
``worker.signals`` when Celery sets up logging), lets the first such warning of an outage
through, then at most one every :data:`OUTAGE_REPEAT_S` (saying for how long, and how many were
left out); :class:`StoreHealth` logs once when the store answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from governance import forksafe
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance")

#: During an outage, at most one warning about it every this many seconds (per process).
OUTAGE_REPEAT_S = 30.0


def _about_an_outage(record: logging.LogRecord) -> bool:
    """Whether a log record reports that the state store could not be reached: it carries a
    :class:`StoreUnavailable`, as an argument or as its exception."""
    args = record.args if isinstance(record.args, tuple) else (record.args,)
    if any(isinstance(arg, StoreUnavailable) for arg in args):
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, StoreUnavailable)


class OutageLog(logging.Filter):
    """Rate-limits the warnings of one process about the state store being unreachable: the
    first one of an outage passes, then at most one every ``repeat_s``; :meth:`ended` says
    when the store answers again. Records about anything else always pass."""

    def __init__(
        self, repeat_s: float = OUTAGE_REPEAT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.repeat_s = repeat_s
        self._clock = clock
        self._lock = forksafe.lock()
        self._since: float | None = None
        self._passed_at = 0.0
        self._left_out = 0
        self._total_left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not _about_an_outage(record):
            return True
        now = self._clock()
        with self._lock:
            # A record long after the last one passed, with no recovery noted meanwhile (by a
            # process whose calls do not go through StoreHealth): a new outage.
            if self._since is None or now - self._passed_at > 4 * self.repeat_s:
                self._since, self._passed_at, self._left_out = now, now, 0
                self._total_left_out = 0
                return True
            if now - self._passed_at < self.repeat_s:
                self._left_out += 1
                self._total_left_out += 1
                return False
            note = (
                f" (the state store has not answered for {now - self._since:.0f} s; "
                f"{self._left_out} similar message(s) since the last one were not logged)"
            )
            record.msg = f"{record.msg}{note.replace('%', '%%')}"
            self._passed_at, self._left_out = now, 0
            return True

    def ended(self) -> tuple[float, int] | None:
        """The store answers again: how long the outage lasted and how many warnings were
        left out, or None when no outage was logged."""
        with self._lock:
            if self._since is None:
                return None
            lasted = self._clock() - self._since
            left_out = self._total_left_out
            self._since, self._left_out, self._total_left_out = None, 0, 0
            return lasted, left_out


#: The outage filter of this process (each forked pool process has its own copy).
OUTAGE_LOG = OutageLog()


def install_outage_log(logger: logging.Logger | None = None) -> None:
    """Put :data:`OUTAGE_LOG` on the handlers of ``logger`` (the root logger by default), where
    every ``governance.*`` record ends up, once."""
    for handler in (logger or logging.getLogger()).handlers:
        if OUTAGE_LOG not in handler.filters:
            handler.addFilter(OUTAGE_LOG)


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
        """Note that the state store answered (after an outage, start the grace period, and
        say once that it is over)."""
        if self._down_since is not None:
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._recovered_at = time.monotonic()
            ended = OUTAGE_LOG.ended()
            if ended is not None:
                lasted, left_out = ended
                log.warning(
                    "the state store answers again, after an outage of %.0f s (%d repeated "
                    "warning(s) about it were not logged)",
                    max(lasted, down_for),
                    left_out,
                )

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
