"""The flag that says task events are on, for the processes that are not workers.

A worker sends task events while a monitor (Flower) asks for them; publishers and ``govctl``
cannot hear a monitor ask (Celery's ``enable_events`` goes to workers only), so the workers
tell them here: each worker whose events are on writes ``DeploymentKeys.events_on`` again
every second or so, with the time its events have left as the key's expiry. The key lapses
when the last worker's events end.
"""

from __future__ import annotations

from governance.store.keys import DeploymentKeys
from governance.store.state import StateStore


def write_events_flag(state: StateStore, node: str, ttl_ms: int) -> None:
    """Say events are on, as ``node``, for ``ttl_ms`` more milliseconds (at least 1). Raises
    :class:`~governance.store.errors.StoreUnavailable`."""
    client = state.client
    ttl = max(1, int(ttl_ms))
    state.run("events flag", lambda: client.set(DeploymentKeys.events_on, node, px=ttl))


def events_flag_on(state: StateStore) -> bool:
    """Whether some worker's task events are on now. Raises
    :class:`~governance.store.errors.StoreUnavailable`."""
    client = state.client
    return bool(state.run("events flag", lambda: client.exists(DeploymentKeys.events_on)))
