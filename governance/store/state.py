"""The handle every store module shares: one client, its registered scripts, and timings.

Every Redis call of the store goes through :meth:`StateStore.call`, which turns any Redis failure
into :class:`StoreUnavailable`, so callers fail closed in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import RedisError

from governance.store.direct import Args, DirectCalls, Packed, expand
from governance.store.errors import StoreUnavailable
from governance.store.lua import Scripts
from governance.store.pending import Pending
from governance.store.vocabulary import SETTINGS

T = TypeVar("T")

DAY_S = 86_400


@dataclass(frozen=True)
class KeyTTL:
    """How long usage windows and task records are kept after their last write, in seconds."""

    run_s: int = 30 * DAY_S
    day_s: int = 40 * DAY_S
    month_s: int = 400 * DAY_S
    task_s: int = 7 * DAY_S


@dataclass(frozen=True)
class LedgerTimings:
    """How the ledger and the wait lists move tasks on (all in milliseconds).

    ``grace_ms``: how long a published task may go unreceived before the reconciler publishes it
    again (doubling with each re-publication, up to ``grace_max_ms``); ``countdown_limit_ms``: the
    longest wait published as a broker countdown, longer ones are parked in the ledger;
    ``scan``: how many waiting tasks a hand-off looks at for one that fits; ``slack_ms``: how early
    a booked task may arrive before its turn; ``sweep_limit``: ledger entries per sweep call.
    """

    grace_ms: int = 60_000
    grace_max_ms: int = 3_600_000
    countdown_limit_ms: int = 900_000
    scan: int = 8
    slack_ms: int = 50
    sweep_limit: int = 200


class StateStore:
    """A Redis client for governance state, with the store's scripts registered on it."""

    def __init__(
        self,
        client: Any,
        *,
        lease_ms: int = 30_000,
        ttl: KeyTTL | None = None,
        timings: LedgerTimings | None = None,
    ) -> None:
        if lease_ms <= 0:
            raise ValueError(f"lease_ms must be positive, got {lease_ms}")
        self.client = client
        self.scripts = Scripts(client)
        #: A single server's scripts and transactions run on per-thread connections (see
        #: ``direct``); a cluster client routes them itself.
        self._direct = DirectCalls(client) if isinstance(client, redis.Redis) else None
        self._local = threading.local()
        self.lease_ms = lease_ms
        self.ttl = ttl or KeyTTL()
        self.timings = timings or LedgerTimings()
        self._settings = {reclaim: self._settings_args(reclaim) for reclaim in (True, False)}

    def _settings_args(self, reclaim: bool) -> Packed:
        t = self.timings
        return Packed(
            SETTINGS.arrange(
                {
                    "lease": self.lease_ms,
                    "grace": t.grace_ms,
                    "grace_max": t.grace_max_ms,
                    "countdown_limit": t.countdown_limit_ms,
                    "scan": t.scan,
                    "slack": t.slack_ms,
                    "sweep_limit": t.sweep_limit,
                    "reclaim": "1" if reclaim else "",
                }
            )
        )

    def script_settings(self, *, reclaim: bool = True) -> Packed:
        """The settings arguments of the scripts that take them (``vocabulary.SETTINGS``),
        packed once."""
        return self._settings[reclaim]

    def call(
        self,
        operation: str,
        script: Callable[..., Any],
        keys: Args,
        args: Args,
    ) -> Any:
        """Run one registered script; any Redis failure becomes :class:`StoreUnavailable`."""
        direct = self._direct
        if direct is not None and isinstance(script, Script):
            return self.run(operation, lambda: direct.call(script, keys, args))
        return self.run(operation, lambda: script(keys=expand(keys), args=expand(args)))

    def begin(
        self,
        operation: str,
        script: Callable[..., Any],
        keys: Args,
        args: Args,
    ) -> Pending[Any]:
        """Start one script call: written now, its reply read by ``result()`` (on this thread),
        so the caller can do other work meanwhile. Against a cluster the call is made at once.
        Any Redis failure, now or when the reply is read, is :class:`StoreUnavailable`."""
        direct = self._direct
        if direct is None or not isinstance(script, Script):
            return Pending.ready(self.call(operation, script, keys, args))
        pending = self.run(operation, lambda: direct.send(script, keys, args))
        return Pending(lambda: self.run(operation, pending.result))

    def transaction(self, operation: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run ``commands`` (``("HSET", key, ...)``, ...) in one ``MULTI``/``EXEC``, all keys in
        one slot; returns their replies. Any Redis failure becomes :class:`StoreUnavailable`."""
        direct = self._direct
        if direct is not None:
            return self.run(operation, lambda: direct.transaction(commands))
        return self.run(operation, lambda: self._pipelined(commands))

    def _pipelined(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        # A transaction pipeline of this thread, reused (making one copies the client's
        # response callbacks).
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._local.pipe = self.client.pipeline(transaction=True)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())

    def run(self, operation: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (some Redis calls); any Redis failure becomes :class:`StoreUnavailable`."""
        try:
            return fn()
        except RedisError as exc:
            raise StoreUnavailable(operation, exc) from exc

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.client.close()
