"""Publishes a governed task again after a delay: a short countdown, or parked in Redis.

Retries and deferrals keep the task id and carry updated governance headers. A delay longer than
the safe bound below the broker's visibility timeout is never a broker countdown (celery #2599,
#3270, kombu #337): it is parked and re-published when due by the workers' maintenance thread.
"""

from __future__ import annotations

import time
from typing import Any

from governance.integration.headers import GovernanceHeaders
from governance.store.parking import ParkedMessage, ParkingLot


def republish(
    app: Any,
    parking: ParkingLot,
    *,
    task_name: str,
    task_id: str,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    headers: GovernanceHeaders,
    delay_ms: int,
    countdown_limit_s: float,
) -> str:
    """Publish the task again in ``delay_ms``; returns ``"countdown"`` or ``"parked"``."""
    if delay_ms / 1000 <= countdown_limit_s:
        app.send_task(
            task_name,
            args=list(args),
            kwargs=kwargs,
            task_id=task_id,
            headers=headers.to_headers(),
            countdown=delay_ms / 1000,
            retries=headers.attempt,
        )
        return "countdown"
    message = ParkedMessage(
        task_name=task_name,
        task_id=task_id,
        args=list(args),
        kwargs=kwargs,
        headers=headers.to_headers(),
    )
    parking.park(message, due_ms=int(time.time() * 1000) + delay_ms)
    return "parked"


def publish_parked(app: Any, message: ParkedMessage) -> None:
    """Publish a parked message now, with its original id and headers."""
    app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=message.task_id,
        headers=message.headers,
        retries=int(message.headers.get("gov_attempt", 0)),
    )


def publish_due_parked(app: Any, parking: ParkingLot) -> int:
    """Publish every parked task that is due now (claim, publish, acknowledge)."""
    published = 0
    for parking_id, message in parking.claim_due():
        publish_parked(app, message)
        parking.acknowledge(parking_id)
        published += 1
    return published
