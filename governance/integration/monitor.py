"""Task events only while a monitor asks for them: who may send one, here and now.

Celery's task events (and the governance layer's: ``task-held``, ``task-deferred``, ...) cost
CPU on every task, and are only for a monitor watching live (Flower). Celery has no switch to
follow: Flower sends ``enable_events`` every 5 s while it runs and never ``disable_events``,
pool processes and publishers send regardless. So each process decides as follows
(:meth:`EventsSwitch.wanted`):

- **a worker's main process** follows its :class:`EventsLease`: events are on for
  ``GOVERNANCE_EVENTS_LEASE_S`` after the last ``enable_events`` it received (the consumer,
  ``worker.consumer``, renews it and switches Celery's own task events off when it lapses);
  a worker started with ``-E`` (or ``worker_send_task_events=True``) always sends;
- **a pool process** runs a governed task with the state its worker handed to the pool with the
  task (:data:`REQUEST_FIELD` of the task's request, set by ``worker.request``);
- **anything else** (a publisher, ``govctl``, a plain task's body) reads the flag in the state
  Redis that workers keep while their events are on (``store.events_flag``), at most once a
  second (:class:`EventsFlag`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from governance import forksafe
from governance.store.errors import StoreUnavailable
from governance.store.events_flag import events_flag_on
from governance.store.state import StateStore

#: The field of a governed task's request (main process to pool process) that says whether its
#: worker's events are on; the worker's main process sets it on every task it hands the pool.
REQUEST_FIELD = "governance_events"

#: How often a process that is not a worker reads the flag, at most.
FLAG_READ_S = 1.0


class EventsLease:
    """Whether a worker sends task events: for ``lease_s`` after the last :meth:`asked`, or
    always (``-E``). Thread-safe: the consumer's loop renews it, anyone reads it."""

    def __init__(
        self,
        lease_s: float,
        *,
        always: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease_s = lease_s
        self.always = always
        self._clock = clock
        self._until = float("-inf")

    def asked(self) -> None:
        """A monitor asked for events (``enable_events``): on for a lease from now."""
        self._until = self._clock() + self.lease_s

    def stopped(self) -> None:
        """A monitor asked for no more events (``disable_events``): off now (unless always)."""
        self._until = float("-inf")

    def on(self) -> bool:
        return self.always or self._clock() < self._until

    def remaining_s(self) -> float:
        """How long events stay on without another ask: a whole lease when always on."""
        if self.always:
            return self.lease_s
        return max(0.0, self._until - self._clock())


class EventsFlag:
    """The state Redis's flag (``store.events_flag``), read at most every ``every_s`` per
    process; off while the store cannot be read (events are for live watching only)."""

    def __init__(
        self,
        state: Callable[[], StateStore],
        every_s: float = FLAG_READ_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._every_s = every_s
        self._clock = clock
        self._lock = forksafe.lock()
        self._pid = 0
        self._next = float("-inf")
        self._on = False
        #: How many times this process read the flag (tests).
        self.reads = 0

    def on(self) -> bool:
        now = self._clock()
        pid = forksafe.pid()
        if pid == self._pid and now < self._next:
            return self._on
        with self._lock:
            if pid == self._pid and now < self._next:
                return self._on
            self._pid, self._next = pid, now + self._every_s
            self.reads += 1
            try:
                self._on = events_flag_on(self._state())
            except StoreUnavailable:
                self._on = False
        return self._on


class EventsSwitch:
    """Whether this process sends task events now (see the module doc); one per runtime."""

    def __init__(self, state: Callable[[], StateStore]) -> None:
        self.flag = EventsFlag(state)
        self._lease: EventsLease | None = None
        self._lease_pid = 0

    def follow_worker(self, lease: EventsLease) -> None:
        """This process is a worker's main process: its events follow ``lease``."""
        self._lease, self._lease_pid = lease, forksafe.pid()

    def worker_lease(self) -> EventsLease | None:
        """The lease of the worker whose main process this is, or None (a pool process forked
        from it, a publisher, ``govctl``)."""
        return self._lease if self._lease_pid == forksafe.pid() else None

    def wanted(self, app: Any = None) -> bool:
        """Whether an event sent here now is wanted: the worker's lease in its main process,
        what the worker said with the governed task that runs here (a pool process), else the
        state Redis's flag."""
        lease = self.worker_lease()
        if lease is not None:
            return lease.on()
        task = getattr(app, "current_worker_task", None) if app is not None else None
        said = getattr(getattr(task, "request", None), REQUEST_FIELD, None)
        if isinstance(said, bool):
            return said
        return self.flag.on()
