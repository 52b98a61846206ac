"""Notifications to reviewers waiting to be sent: an outbox per tenant, in the tenant's slot.

The held-store script that holds a task (or files a suggestion) adds its notification here, in
the same atomic call; the maintenance leader sends what is due, and reschedules a failure with
backoff. Nothing here ever blocks a worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from governance.store.keys import TenantKeys
from governance.store.state import StateStore


@dataclass(frozen=True)
class Notification:
    """One notification of one held task: its body, how many notifiers, attempts so far."""

    id: str
    body: dict[str, Any]
    notifiers: int
    attempts: int
    sent: tuple[int, ...] = ()


class Outbox:
    def __init__(self, state: StateStore) -> None:
        self._state = state

    def due(self, tenant: str, limit: int = 20) -> list[Notification]:
        keys = TenantKeys(tenant)
        now = int(time.time() * 1000)

        def read() -> list[Notification]:
            ids = self._state.client.zrangebyscore(keys.outbox, "-inf", now, start=0, num=limit)
            if not ids:
                return []
            raw = self._state.client.hmget(keys.notifications, ids)
            found = []
            for nid, value in zip(ids, raw, strict=True):
                if value is None:
                    self._state.client.zrem(keys.outbox, nid)
                    continue
                data = json.loads(value)
                found.append(
                    Notification(
                        id=nid.decode() if isinstance(nid, bytes) else str(nid),
                        body=dict(data.get("body") or {}),
                        notifiers=int(data.get("notifiers", 0)),
                        attempts=int(data.get("attempts", 0)),
                        sent=tuple(int(i) for i in data.get("sent") or ()),
                    )
                )
            return found

        return self._state.run("outbox read", read)

    def retry_later(
        self, tenant: str, notification: Notification, sent: set[int], delay_s: float
    ) -> None:
        """Try again after ``delay_s`` the notifiers not in ``sent``."""
        keys = TenantKeys(tenant)
        record = {
            "body": notification.body,
            "notifiers": notification.notifiers,
            "attempts": notification.attempts + 1,
            "sent": sorted(sent),
        }
        when = int((time.time() + delay_s) * 1000)

        self._state.transaction(
            "outbox write",
            [
                ("HSET", keys.notifications, notification.id, json.dumps(record)),
                ("ZADD", keys.outbox, when, notification.id),
            ],
        )

    def done(self, tenant: str, notification_id: str) -> None:
        keys = TenantKeys(tenant)

        self._state.transaction(
            "outbox write",
            [
                ("HDEL", keys.notifications, notification_id),
                ("ZREM", keys.outbox, notification_id),
            ],
        )
