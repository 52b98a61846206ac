"""Keeps the leases of running tasks alive: one background thread per process, for every task.

Registering a task is a set insertion, so short tasks pay nothing; the thread renews all
registered leases every heartbeat interval. A worker killed with SIGKILL stops renewing, and its
slots come back when the leases expire. The same thread runs a small periodic ``tick`` (the
process's owed audit seals are flushed there), so a process has one such thread, not two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from governance import forksafe
from governance.store.admission import AdmissionTicket
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.leases")


class LeaseKeeper:
    """Renews the leases registered with :meth:`hold` until they are released."""

    def __init__(
        self,
        renew: Callable[[AdmissionTicket], int],
        interval_s: float,
        *,
        tick: Callable[[], None] | None = None,
        tick_s: float = 0.25,
    ) -> None:
        self._renew = renew
        self._interval_s = interval_s
        self._tick = tick
        self._tick_s = tick_s
        self._tickets: set[AdmissionTicket] = set()
        self._lock = forksafe.lock()
        self._wake = forksafe.event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @contextmanager
    def hold(self, ticket: AdmissionTicket) -> Iterator[None]:
        """Keep ``ticket``'s lease alive while the block runs."""
        self.keep(ticket)
        try:
            yield
        finally:
            self.release(ticket)

    def keep(self, ticket: AdmissionTicket) -> None:
        """Keep ``ticket``'s lease alive until :meth:`release`."""
        with self._lock:
            self._tickets.add(ticket)
            self._start_if_needed()

    def release(self, ticket: AdmissionTicket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    def start(self) -> None:
        """Start the thread now (it also starts with the first lease)."""
        with self._lock:
            self._start_if_needed()

    def _start_if_needed(self) -> None:
        # After a fork the parent's thread does not exist in the child: start our own.
        if self._thread is not None and self._pid == forksafe.pid() and self._thread.is_alive():
            return
        self._pid = forksafe.pid()
        self._thread = threading.Thread(target=self._loop, name="governance-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        step = min(self._interval_s, self._tick_s) if self._tick else self._interval_s
        next_renewal = time.monotonic() + self._interval_s
        while not self._wake.wait(step):
            if self._tick is not None:
                try:
                    self._tick()
                except Exception:
                    log.warning("periodic flush failed", exc_info=True)
            if time.monotonic() < next_renewal:
                continue
            next_renewal = time.monotonic() + self._interval_s
            with self._lock:
                tickets = list(self._tickets)
            for ticket in tickets:
                try:
                    if self._renew(ticket) == 0:
                        log.warning(
                            "lease of task %s (attempt %s) was lost: it expired or another "
                            "delivery took it over",
                            ticket.task_id,
                            ticket.attempt,
                        )
                except StoreUnavailable as exc:
                    log.warning("could not renew the lease of task %s: %s", ticket.task_id, exc)
