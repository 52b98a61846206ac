"""Confirmations of durability, batched, on a thread of the process (``store.durability``).

With ``GOVERNANCE_STATE_DURABILITY`` set, a task that comes to live only in the state Redis is
confirmed durable before anyone is told it was accepted: the worker's main process acknowledges
its broker message only then (``worker.durable_ack``), a publisher returns only then
(``GovernanceRuntime.confirm_recorded``). Both hand the task to :class:`Confirmations`, one
thread per process: it takes every task asked about since its last round and confirms them in
one round (one fsync wait per server, whatever the number), then the next batch. So a backlog
of arrivals costs one wait per batch, and no pool process waits for one: the pool process
raises, the worker's main process acknowledges.

A task not confirmed is tried again each round until its deadline; then its caller decides
(the worker gives the message back to the broker, a publisher raises ``NotDurable``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from governance import forksafe
from governance.store.durability import Durability, Verdict
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.durability")

#: How long the thread rests after a round the store did not answer.
OUTAGE_PAUSE_S = 0.2

#: What a caller is told: the verdict, and why it was not confirmed (when it was not).
Done = Callable[[Verdict, str], None]


@dataclass(eq=False)
class _Asked:
    tenant: str
    task_id: str
    deadline: float
    done: Done
    tries: int = field(default=0)


class Confirmations:
    """One thread of this process confirms, in batches, the tasks it is asked about."""

    def __init__(self, durability: Callable[[], Durability]) -> None:
        self._durability = durability
        self._cond = forksafe.condition()
        self._asked: list[_Asked] = []
        self._thread: threading.Thread | None = None
        self._pid = forksafe.pid()
        #: Rounds made, and tasks confirmed in them (for the tests and the bench).
        self.rounds = 0
        self.confirmed = 0

    def later(self, tenant: str, task_id: str, deadline: float, done: Done) -> None:
        """Confirm ``task_id`` of ``tenant`` in the next round: ``done(verdict, why)`` is called
        on the thread, with DURABLE or MISSING, or UNCONFIRMED once ``deadline``
        (``time.monotonic()``) has passed without a confirmation."""
        with self._cond:
            self._asked.append(_Asked(tenant, task_id, deadline, done))
            self._start()
            self._cond.notify()

    def wait(self, tenant: str, task_id: str, timeout_s: float) -> tuple[Verdict, str]:
        """Confirm ``task_id`` and wait for the verdict (at most about ``timeout_s``)."""
        found: list[tuple[Verdict, str]] = []
        ready = threading.Event()  # one wait's, never held across a fork

        def done(verdict: Verdict, why: str) -> None:
            found.append((verdict, why))
            ready.set()

        self.later(tenant, task_id, time.monotonic() + timeout_s, done)
        # One round past the deadline at most: the round in flight then ends it.
        if not ready.wait(timeout_s + 5.0):
            return Verdict.UNCONFIRMED, f"no confirmation within {timeout_s:g} s"
        return found[0]

    def _start(self) -> None:
        if self._thread is not None and self._pid == forksafe.pid() and self._thread.is_alive():
            return
        self._pid = forksafe.pid()  # a thread of the parent did not survive a fork
        self._thread = threading.Thread(target=self._run, name="governance-durability", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._asked:
                    self._cond.wait()
                batch, self._asked = self._asked, []
            again = self._round(batch)
            if again:
                with self._cond:
                    self._asked[:0] = again

    def _round(self, batch: list[_Asked]) -> list[_Asked]:
        """Confirm ``batch`` once; returns the tasks to ask about again."""
        items = [(a.tenant, a.task_id) for a in batch]
        try:
            result = self._durability().confirm(items)
            verdicts, why = result.verdicts, "; ".join(result.problems)
            failed = False
        except StoreUnavailable as exc:
            verdicts, why, failed = {}, str(exc), True
        self.rounds += 1
        now = time.monotonic()
        again = []
        for asked in batch:
            asked.tries += 1
            verdict = verdicts.get((asked.tenant, asked.task_id), Verdict.UNCONFIRMED)
            if verdict is Verdict.UNCONFIRMED and now < asked.deadline:
                again.append(asked)
                continue
            if verdict is Verdict.DURABLE:
                self.confirmed += 1
            try:
                asked.done(verdict, why)
            except Exception:
                log.exception("the confirmation of task %s could not be handed on", asked.task_id)
        if again and failed:
            time.sleep(OUTAGE_PAUSE_S)  # a store that does not answer: no busy loop
        return again
