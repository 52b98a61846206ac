"""Attempts that ran but could not be settled before their delivery had to be acknowledged.

A worker tries to settle a finished attempt for ``settle_patience_s``, but never for longer than
half the broker's limit on an unacknowledged delivery: past RabbitMQ's ``consumer_timeout`` the
broker closes the channel (and the worker dies with it, celery #6760); past a Redis broker's
visibility timeout the message is delivered again. So the delivery is acknowledged, and the
settlement is kept here, in the worker process, tried again on every tick of the lease thread
until the state store answers, the attempt's lease renewed meanwhile so nobody takes the task
over. Only a process that dies first leaves the attempt to the reconciler (it may run again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from governance import forksafe
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance")


class UnsettledAttempts:
    """Settlements owed by this process, by the holder of the attempt they settle."""

    def __init__(self) -> None:
        self._owed: dict[str, Callable[[], None]] = {}
        self._lock = forksafe.lock()

    def add(self, holder: str, settle: Callable[[], None]) -> None:
        with self._lock:
            self._owed[holder] = settle

    def __len__(self) -> int:
        with self._lock:
            return len(self._owed)

    def retry(self) -> None:
        """Settle what is owed, oldest first; stop at the first the store still refuses."""
        with self._lock:
            owed = list(self._owed.items())
        for holder, settle in owed:
            try:
                settle()
            except StoreUnavailable:
                return
            except Exception:
                log.exception("settling attempt %s in the background failed; dropped", holder)
            with self._lock:
                self._owed.pop(holder, None)
            log.info("attempt %s settled in the background: the state store is back", holder)
