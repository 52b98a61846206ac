"""Parked tasks: delays too long for a broker countdown wait here until they are due.

With the Redis broker, a message not acknowledged within ``visibility_timeout`` is delivered
again, so a countdown longer than that runs the task twice (celery #2599, kombu #337). Long waits
(a long Retry-After, a long deferral) are therefore parked in a sorted set and re-published when
due by whichever worker claims them first.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from governance.store.keys import DeploymentKeys
from governance.store.state import StateStore


@dataclass(frozen=True)
class ParkedMessage:
    """Everything needed to publish the task again: name, arguments, id, headers, routing."""

    task_name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    queue: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "task_name": self.task_name,
                "task_id": self.task_id,
                "args": self.args,
                "kwargs": self.kwargs,
                "headers": self.headers,
                "queue": self.queue,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ParkedMessage:
        data = json.loads(raw)
        return cls(**data)


class ParkingLot:
    """Parks messages until a due time, and hands due ones to exactly one claimer at a time."""

    def __init__(self, state: StateStore, *, claim_ms: int = 30_000) -> None:
        self._state = state
        self._claim_ms = claim_ms

    def park(self, message: ParkedMessage, due_ms: int) -> str:
        """Keep ``message`` until ``due_ms`` (ms since the epoch); returns the parking id."""
        parking_id = f"{message.task_id}:{uuid.uuid4().hex[:12]}"

        def write() -> None:
            pipe = self._state.client.pipeline(transaction=True)
            pipe.hset(DeploymentKeys.parked_messages, parking_id, message.to_json())
            pipe.zadd(DeploymentKeys.parked_due, {parking_id: due_ms})
            pipe.execute()

        self._state.run("parking", write)
        return parking_id

    def claim_due(self, limit: int = 100) -> list[tuple[str, ParkedMessage]]:
        """Claim up to ``limit`` due messages; acknowledge each once it is published again."""
        keys = [
            DeploymentKeys.parked_due,
            DeploymentKeys.parked_claimed,
            DeploymentKeys.parked_messages,
        ]
        reply = self._state.call(
            "parking claim", self._state.scripts.park_claim, keys, [limit, self._claim_ms]
        )
        pairs = zip(reply[0::2], reply[1::2], strict=True)
        return [(_text(i), ParkedMessage.from_json(m)) for i, m in pairs]

    def acknowledge(self, parking_id: str) -> None:
        """Forget a message that was published again."""

        def forget() -> None:
            pipe = self._state.client.pipeline(transaction=True)
            pipe.zrem(DeploymentKeys.parked_claimed, parking_id)
            pipe.hdel(DeploymentKeys.parked_messages, parking_id)
            pipe.execute()

        self._state.run("parking acknowledge", forget)

    def count(self) -> int:
        """Messages parked or claimed and not yet acknowledged."""
        return int(
            self._state.run(
                "parking count", lambda: self._state.client.hlen(DeploymentKeys.parked_messages)
            )
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
