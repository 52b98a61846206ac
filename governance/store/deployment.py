"""The deployment marker: what tells a Redis holding a deployment's governance state apart from
any other Redis (the broker's database 0, an empty one, a typo in a URL).

Workers write it when they start and refresh it while they run (``DeploymentKeys.marker``, one
small JSON string, no expiry: the state stays a deployment's while no worker runs). Readers
that would otherwise answer from an empty database (``govctl``) check for it first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from governance.store.keys import DeploymentKeys
from governance.store.state import StateStore


@dataclass(frozen=True)
class DeploymentMarker:
    """Who marked this Redis as a deployment's state, and when (epoch milliseconds)."""

    first_node: str
    first_ms: int
    node: str
    at_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_node": self.first_node,
            "first_ms": self.first_ms,
            "node": self.node,
            "at_ms": self.at_ms,
        }


def write_marker(state: StateStore, node: str, now_ms: int | None = None) -> DeploymentMarker:
    """Mark the state Redis as this deployment's, as ``node`` (a worker), keeping who marked
    it first. Raises :class:`~governance.store.errors.StoreUnavailable`."""
    at_ms = int(time.time() * 1000) if now_ms is None else now_ms
    client = state.client

    def write() -> DeploymentMarker:
        found = _parse(client.get(DeploymentKeys.marker))
        marker = DeploymentMarker(
            first_node=found.first_node if found else node,
            first_ms=found.first_ms if found else at_ms,
            node=node,
            at_ms=at_ms,
        )
        client.set(DeploymentKeys.marker, json.dumps(marker.as_dict()))
        return marker

    return state.run("deployment marker", write)


def read_marker(state: StateStore) -> DeploymentMarker | None:
    """The marker of the state Redis, or None when no worker ever marked it. Raises
    :class:`~governance.store.errors.StoreUnavailable`."""
    client = state.client
    return _parse(state.run("deployment marker", lambda: client.get(DeploymentKeys.marker)))


def _parse(raw: Any) -> DeploymentMarker | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return DeploymentMarker(
            first_node=str(data["first_node"]),
            first_ms=int(data["first_ms"]),
            node=str(data["node"]),
            at_ms=int(data["at_ms"]),
        )
    except (ValueError, KeyError, TypeError):
        # Written by something else, or by hand: a marker all the same (someone meant it).
        return DeploymentMarker(first_node="?", first_ms=0, node="?", at_ms=0)
