"""Acknowledging a delivery once what it left in the state Redis is durable (worker side of
``GOVERNANCE_STATE_DURABILITY``, see :mod:`governance.integration.durable`).

A delivery that ends with its task waiting, parked or held (or as a copy of a task whose
record must not be lost) raises :class:`AckWhenDurable` in the pool process, a Celery
``Ignore`` that carries the task's tenant and id: the pool process goes on to its next task at
once. The worker's main process, which acknowledges messages, receives it
(``GovernedRequest.on_failure``) and hands the task to the process's confirmations; the
acknowledgement is made on the worker's event loop when the record is confirmed durable. A
record not there (lost with a crash or a failover), or not confirmed within half the broker's
limit on an unacknowledged delivery, gives the message back to the broker instead: its next
delivery decides again, on the state Redis as it is then.

A message waiting for its confirmation is unacknowledged, so it holds one of the worker's
prefetch slots although no pool process works on it: while it does, the worker's prefetch is
raised by one (as Celery does for a task with an ETA), up to ``PREFETCH_FACTOR`` times its own,
so the pool keeps receiving work and a backlog of arrivals is confirmed in large batches.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Ignore
from kombu.asynchronous import get_event_loop

from governance.integration.runtime import installed_on
from governance.store.durability import Verdict

log = logging.getLogger("governance.durability")

#: How far above its own prefetch a worker's prefetch rises for deliveries awaiting their
#: confirmation.
PREFETCH_FACTOR = 8

#: The worker's consumer (its prefetch), from ``follow_consumer``; and by how much its prefetch
#: is raised now.
_consumer: list[Any] = []
_raised = [0]


def follow_consumer(consumer: Any) -> None:
    """The worker's consumer, whose prefetch deliveries awaiting confirmation raise."""
    _consumer[:] = [consumer]


def _raise_prefetch() -> bool:
    """One more prefetch slot for a delivery awaiting its confirmation, within the bound."""
    consumer = _consumer[0] if _consumer else None
    qos = getattr(consumer, "qos", None)
    if qos is None:
        return False
    bound = max(1, int(getattr(consumer, "initial_prefetch_count", 1) or 1)) * PREFETCH_FACTOR
    if _raised[0] >= bound:
        return False
    qos.increment_eventually()
    _raised[0] += 1
    return True


def _lower_prefetch() -> None:
    qos = getattr(_consumer[0], "qos", None) if _consumer else None
    if qos is not None and _raised[0] > 0:
        qos.decrement_eventually()
        _raised[0] -= 1


class AckWhenDurable(Ignore):  # type: ignore[misc]
    """The delivery of ``task_id`` of ``tenant`` ends here; its message is acknowledged once the
    task's record is confirmed durable (raised in the pool process, read in the main one)."""

    def __init__(self, tenant: str, task_id: str) -> None:
        super().__init__(tenant, task_id)
        self.tenant, self.task_id = tenant, task_id


def defer_ack(request: Any, wanted: AckWhenDurable) -> None:
    """Acknowledge ``request``'s message once ``wanted``'s record is durable (see the module
    doc); called in the worker's main process."""
    runtime = installed_on(request.task.app)
    if runtime is None or not runtime.durable_on:
        request.acknowledge()
        return
    hub = get_event_loop()
    deadline = time.monotonic() + runtime.settings.unacked_limit_s / 2
    raised = _raise_prefetch()

    def done(verdict: Verdict, why: str) -> None:
        if hub is None:
            _finish(request, wanted, verdict, why, raised)
        else:  # the message is acknowledged on the worker's own loop, never on this thread
            hub.call_soon(_finish, request, wanted, verdict, why, raised)  # type: ignore[no-untyped-call]

    runtime.confirmations.later(wanted.tenant, wanted.task_id, deadline, done)


def _finish(request: Any, wanted: AckWhenDurable, verdict: Verdict, why: str, raised: bool) -> None:
    if raised:
        _lower_prefetch()
    if verdict is Verdict.DURABLE:
        request.acknowledge()
        return
    if verdict is Verdict.MISSING:
        log.warning(
            "task %s: its record is not on the state Redis (lost with a crash or a failover): "
            "its message goes back to the broker, and its next delivery decides again",
            wanted.task_id,
        )
    else:
        log.warning(
            "task %s: not confirmed durable in time (%s): its message goes back to the broker",
            wanted.task_id,
            why,
        )
    # Celery's ``reject`` would also send ``task-rejected`` (Flower: REJECTED): the task is
    # not rejected, its message is only given back.
    if not request.acknowledged:
        request._on_reject(log, request._connection_errors, True)
        request.acknowledged = True
