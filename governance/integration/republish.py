"""Publishes a governed task again after a delay: a short countdown, or parked in Redis.

Retries and deferrals keep the task id and carry updated governance headers. A delay longer than
the safe bound below the broker's visibility timeout is never a broker countdown (celery #2599,
#3270, kombu #337): it is parked and re-published when due by :class:`ParkedTaskPump`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from governance.integration.headers import GovernanceHeaders
from governance.store.errors import StoreUnavailable
from governance.store.parking import ParkedMessage, ParkingLot

log = logging.getLogger("governance.republish")


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


class ParkedTaskPump:
    """A worker thread that publishes parked tasks once they are due (claim, publish, ack)."""

    def __init__(self, app: Any, parking: ParkingLot, poll_s: float) -> None:
        self._app = app
        self._parking = parking
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="governance-parking", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def pump_once(self) -> int:
        """Publish every parked task that is due now; returns how many were published."""
        published = 0
        for parking_id, message in self._parking.claim_due():
            publish_parked(self._app, message)
            self._parking.acknowledge(parking_id)
            published += 1
        return published

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.pump_once()
            except StoreUnavailable as exc:
                log.warning("parked tasks not published this round: %s", exc)
            except Exception:
                log.exception("parked tasks not published this round")
