"""The worker pool of a queue: its capacity and its fair-share state (fair dispatch).

Each worker says it is alive, with its pool size, for each queue it consumes
(:meth:`Pools.heartbeat`); the pool's capacity is the sum over its live workers (or a number the
policy sets). While the pool is saturated, tasks that cannot run wait in their tenants' wait
lists, and :meth:`Pools.dispatch` gives freed capacity to the tenant furthest below its weighted
fair share (``scripts/pool_dispatch.lua``; the arithmetic is in
:mod:`governance.policy.fairness`). The pool's keys are in a slot of their own and hold
scheduling state only: the tenant's own call (:meth:`governance.store.ledger.Ledger.dispatch`)
hands its tasks on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from governance.policy.fairness import FairShare
from governance.store.keys import PoolKeys
from governance.store.state import StateStore
from governance.store.vocabulary import POOL_DISPATCH, POOL_WORKER

#: A grant whose task never settles (its record lost) is given back after this long.
GRANT_TTL_MS = 15 * 60_000


#: The prefetch per pool process a pool's bound counts by default (a worker's
#: ``worker_prefetch_multiplier`` of 1, as the example deployment sets).
PREFETCH = 1


@dataclass(frozen=True)
class Completion:
    """A task of ``tenant`` ended: what it is charged, how long it ran, and its grant when fair
    dispatch handed it on."""

    tenant: str
    cost: float
    run_ms: float
    grant: str = ""


@dataclass(frozen=True)
class Returned:
    """Grants ``tenant`` could not use; ``done``: it has nothing the pool can give capacity to
    now: its wait list is empty (it leaves the pool's ready set until a task of it waits
    again), or, ``blocked``, its own limits stand in the way (it keeps its place and is passed
    over until one of its tasks ends or it registers again)."""

    tenant: str
    grants: tuple[str, ...]
    done: bool
    blocked: bool = False


@dataclass(frozen=True)
class PoolGlance:
    """What a process caches of a pool: whether it is saturated, and its capacity."""

    saturated: bool
    capacity: int


@dataclass(frozen=True)
class Grant:
    """What one pool call did: the tenant given capacity and its grants (none: nothing given),
    whether the pool is saturated, its capacity and the dispatched tasks in flight."""

    tenant: str | None
    grants: tuple[str, ...]
    saturated: bool
    capacity: int
    in_flight: int


@dataclass(frozen=True)
class PoolState:
    """A pool as operators see it (govctl status, metrics)."""

    queue: str
    capacity: int
    saturated: bool
    in_flight: int
    waiting_tenants: tuple[str, ...]
    weights: dict[str, float]


class Pools:
    """The worker pools of the deployment, one per queue."""

    def __init__(self, state: StateStore, fairness: FairShare | None = None) -> None:
        self._state = state
        self.fairness = fairness or FairShare()

    def heartbeat(self, queue: str, node: str, concurrency: int, ttl_ms: int) -> int:
        """``node`` serves ``queue`` with ``concurrency`` processes (0: it leaves) for ``ttl_ms``
        unless it beats again; returns the pool's capacity now."""
        keys = PoolKeys(queue)
        args = POOL_WORKER.arrange({"node": node, "concurrency": concurrency, "ttl_ms": ttl_ms})
        return int(
            self._state.call(
                "pool heartbeat", self._state.scripts.pool_worker, [keys.workers], args
            )
        )

    def dispatch(
        self,
        queue: str,
        *,
        completed: Completion | None = None,
        returned: Returned | None = None,
        register: Iterable[tuple[str, float]] = (),
        saturate: bool = False,
        give: bool = True,
        prefetch: int = PREFETCH,
    ) -> Grant:
        """One call on ``queue``'s pool: take note of what ended, of unused grants and of
        tenants whose tasks wait for it; mark it saturated (the broker is backlogged); and,
        with ``give``, give freed capacity to the tenant furthest below its fair share."""
        fair = self.fairness
        keys = PoolKeys(queue)
        capacity = fair.capacity.get(queue)
        registered = [[tenant, weight] for tenant, weight in register]
        args = POOL_DISPATCH.arrange(
            {
                "completed": completed.grant if completed else "",
                "completed_tenant": completed.tenant if completed else "",
                "completed_cost": round(completed.cost) if completed else "",
                "completed_run_ms": round(completed.run_ms) if completed else "",
                "returned": json.dumps(list(returned.grants)) if returned else "",
                "returned_tenant": returned.tenant if returned else "",
                "returned_done": "1" if returned and returned.done else "",
                "returned_blocked": "1" if returned and returned.blocked else "",
                "register": json.dumps(registered) if registered else "",
                "saturate": "1" if saturate else "",
                "dispatch": "1" if give else "",
                "capacity": capacity if capacity is not None else "",
                "prefetch": prefetch,
                "slack_ms": fair.slack_ms,
                "default_run_ms": fair.default_run_ms,
                "default_cost": round(fair.default_cost),
                "grant_ttl_ms": GRANT_TTL_MS,
            }
        )
        raw = self._state.call("pool dispatch", self._state.scripts.pool_dispatch, keys.all(), args)
        reply: dict[str, Any] = json.loads(raw)
        grants = reply.get("grants")
        return Grant(
            tenant=reply.get("tenant") or None,
            grants=tuple(grants) if isinstance(grants, list) else (),
            saturated=bool(reply.get("saturated")),
            capacity=int(reply.get("capacity") or 0),
            in_flight=int(reply.get("in_flight") or 0),
        )

    def mean_run_ms(self, queue: str, tenant: str) -> float | None:
        """The running mean of ``tenant``'s run time on ``queue``'s pool (ms), None before
        any of its tasks settled there."""
        tenants = PoolKeys(queue).tenants
        found = self._state.run(
            "pool tenant", lambda: self._state.client.hget(tenants, f"{tenant}:ms")
        )
        try:
            return float(found) if found is not None else None
        except (TypeError, ValueError):
            return None

    def saturated(self, queues: Sequence[str]) -> dict[str, bool]:
        """Whether each pool is saturated now (one pipelined read)."""
        return {q: glance.saturated for q, glance in self.glance(queues).items()}

    def glance(self, queues: Sequence[str]) -> dict[str, PoolGlance]:
        """Whether each pool is saturated now, and its capacity (one pipelined read; what
        processes cache)."""
        if not queues:
            return {}

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for queue in queues:
                pipe.hget(PoolKeys(queue).state, "saturated")
                pipe.hgetall(PoolKeys(queue).workers)
            return list(pipe.execute())

        replies = self._state.run("pool state", read)
        now_ms = int(time.time() * 1000)
        return {
            queue: PoolGlance(
                saturated=replies[2 * i] in (b"1", "1"),
                capacity=self._capacity(queue, replies[2 * i + 1], now_ms),
            )
            for i, queue in enumerate(queues)
        }

    def _capacity(self, queue: str, workers: Mapping[Any, Any], now_ms: int) -> int:
        """The policy's capacity of ``queue``, else its live workers' pool sizes."""
        capacity = self.fairness.capacity.get(queue)
        if capacity is not None:
            return capacity
        live = 0
        for value in workers.values():
            size, _, expires = _text(value).partition(":")
            if size.isdigit() and expires.isdigit() and int(expires) > now_ms:
                live += int(size)
        return live

    def state(self, queue: str) -> PoolState:
        """``queue``'s pool as operators see it."""
        keys = PoolKeys(queue)

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            pipe.hgetall(keys.workers)
            pipe.hget(keys.state, "saturated")
            pipe.zcard(keys.grants)
            pipe.zrange(keys.ready, 0, -1)
            pipe.hgetall(keys.tenants)
            return list(pipe.execute())

        workers, saturated, in_flight, ready, tenants = self._state.run("pool state", read)
        now_ms = int(time.time() * 1000)  # the heartbeats' expiries are the server's clock
        capacity = self._capacity(queue, workers, now_ms)
        weights = {
            _text(name).rsplit(":", 1)[0]: float(_text(value))
            for name, value in tenants.items()
            if _text(name).endswith(":w")
        }
        return PoolState(
            queue=queue,
            capacity=capacity,
            saturated=saturated in (b"1", "1"),
            in_flight=int(in_flight),
            waiting_tenants=tuple(_text(t) for t in ready),
            weights=weights,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
