"""What every worker does for the worker pools of the queues it consumes (fair dispatch), in its
maintenance rounds.

- Its heartbeat: its pool size for each queue, every ``HEARTBEAT_S``, so the pool's capacity
  is the sum over its live workers; a worker killed stops beating, and its capacity leaves when
  its entry expires (``3 * HEARTBEAT_S``); a worker that shuts down says it leaves.
- While a pool is saturated: a dispatch round, so capacity that freed without a settlement (a
  worker joined, a grant came back) is given out; every worker of the queue does it, each
  round, so no queue depends on one worker.
- When it leads: the tenants with waiting tasks are (re)registered with the saturated pools,
  so a tenant whose tasks wait without a task of its own running still gets its share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from governance.integration.runtime import GovernanceRuntime
from governance.integration.worker.dispatch import dispatch
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.fairness")

#: How often a worker says it is alive to the pools it serves.
HEARTBEAT_S = 2.0


class PoolKeeper:
    """The pools one worker serves: queue -> its pool size there."""

    def __init__(self, runtime: GovernanceRuntime, node: str, serves: Mapping[str, int]) -> None:
        self._runtime = runtime
        self._node = node
        self.serves = dict(serves)
        self._next_beat = 0.0

    def round(self, leading: bool, waiting_tenants: Iterable[str] = ()) -> None:
        """One maintenance round: the heartbeat when due, dispatch for the saturated pools,
        and (when leading) the tenants that wait registered with them."""
        runtime = self._runtime
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_S
            self._beat(round(3 * HEARTBEAT_S * 1000))
        waiting = list(waiting_tenants) if leading else []
        for queue in self.serves:
            if not runtime.pool_view.saturated(queue):
                continue
            if waiting:
                register = [(t, self._weight(t)) for t in waiting]
                runtime.pool_view.pools.dispatch(queue, register=register, give=False)
            dispatch(runtime, queue)

    def leave(self) -> None:
        """The worker shuts down: its capacity leaves the pools at once."""
        try:
            self._beat(0, leaving=True)
        except StoreUnavailable as exc:
            log.info("could not tell the pools this worker leaves (they forget it soon): %s", exc)

    def _beat(self, ttl_ms: int, leaving: bool = False) -> None:
        pools = self._runtime.pool_view.pools
        for queue, concurrency in self.serves.items():
            pools.heartbeat(queue, self._node, 0 if leaving else concurrency, ttl_ms)

    def _weight(self, tenant: str) -> float:
        policy = self._runtime.policy.tenant(tenant)
        return policy.weight if policy is not None else 1.0


def served_pools(consumer: Any) -> dict[str, int]:
    """The queues a worker consumes and its pool size (the same in each), from its consumer
    (the sender of Celery's ``worker_ready``)."""
    controller = getattr(consumer, "controller", None)
    concurrency = getattr(controller, "concurrency", None)
    if not isinstance(concurrency, int) or concurrency <= 0:
        return {}
    queues = consumer.app.amqp.queues
    consumed = getattr(queues, "consume_from", None) or queues
    return {str(name): concurrency for name in consumed}
