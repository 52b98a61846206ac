"""Keeps the leases of running tasks alive: one renewal thread per process, for every task.

Registering a task is a set insertion, so short tasks pay nothing; the thread renews all
registered leases every heartbeat interval. A worker killed with SIGKILL stops renewing, and its
slots come back when the leases expire.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from governance.store.admission import AdmissionTicket
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.leases")


class LeaseKeeper:
    """Renews the leases registered with :meth:`hold` until they are released."""

    def __init__(self, renew: Callable[[AdmissionTicket], int], interval_s: float) -> None:
        self._renew = renew
        self._interval_s = interval_s
        self._tickets: set[AdmissionTicket] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @contextmanager
    def hold(self, ticket: AdmissionTicket) -> Iterator[None]:
        """Keep ``ticket``'s lease alive while the block runs."""
        with self._lock:
            self._tickets.add(ticket)
            self._start_if_needed()
        try:
            yield
        finally:
            with self._lock:
                self._tickets.discard(ticket)

    def _start_if_needed(self) -> None:
        # After a fork the parent's thread does not exist in the child: start our own.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="governance-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._wake.wait(self._interval_s):
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
