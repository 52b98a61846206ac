"""The handle every store module shares: one client, its registered scripts, and timings.

Every Redis call of the store goes through :meth:`StateStore.call`, which turns any Redis failure
into :class:`StoreUnavailable`, so callers fail closed in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from governance.store.errors import StoreUnavailable
from governance.store.lua import Scripts

T = TypeVar("T")

DAY_S = 86_400


@dataclass(frozen=True)
class KeyTTL:
    """How long usage windows and task records are kept after their last write, in seconds."""

    run_s: int = 30 * DAY_S
    day_s: int = 40 * DAY_S
    month_s: int = 400 * DAY_S
    task_s: int = 7 * DAY_S


class StateStore:
    """A Redis client for governance state, with the store's scripts registered on it."""

    def __init__(
        self,
        client: Any,
        *,
        lease_ms: int = 30_000,
        retry_hint_ms: int = 250,
        ttl: KeyTTL | None = None,
    ) -> None:
        if lease_ms <= 0:
            raise ValueError(f"lease_ms must be positive, got {lease_ms}")
        self.client = client
        self.scripts = Scripts(client)
        self.lease_ms = lease_ms
        self.retry_hint_ms = retry_hint_ms
        self.ttl = ttl or KeyTTL()

    def call(
        self,
        operation: str,
        script: Callable[..., Any],
        keys: Sequence[str],
        args: Sequence[str | int | float],
    ) -> Any:
        """Run one registered script; any Redis failure becomes :class:`StoreUnavailable`."""
        return self.run(operation, lambda: script(keys=list(keys), args=list(args)))

    def call_packed(
        self,
        operation: str,
        script: Callable[..., Any],
        keys: Sequence[str],
        args: Sequence[str | int | float],
    ) -> Any:
        """Like :meth:`call`, for scripts that take their ARGV as one JSON array of strings:
        one argument to encode instead of dozens (the hot path's main client-side cost)."""
        packed = json.dumps([a if isinstance(a, str) else _number(a) for a in args])
        return self.call(operation, script, keys, [packed])

    def run(self, operation: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (some Redis calls); any Redis failure becomes :class:`StoreUnavailable`."""
        try:
            return fn()
        except RedisError as exc:
            raise StoreUnavailable(operation, exc) from exc

    def close(self) -> None:
        self.client.close()


def _number(value: int | float) -> str:
    """A number as Lua's tonumber() reads it back exactly (no float noise for integers)."""
    return str(value) if isinstance(value, int) or not value.is_integer() else str(int(value))
