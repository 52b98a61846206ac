"""What one process knows of the worker pools (fair dispatch): which queue a task goes to,
whether that queue's pool is saturated, and the policy's fair-share settings.

Whether a pool is saturated decides two things on the hot path: a publisher keeps a task out
of the broker (it waits in its tenant's wait list from publication), and a settlement leaves
the capacity it frees to the pool instead of handing it to its own tenant's next task. Asking the
pool on every task would add a call to every task; so each process reads the flag of the queues
it uses at most every ``REFRESH_S`` (one pipelined read) and keeps it meanwhile. A process that
finds the broker backlogged (a message that waited longer than ``BACKLOG_MS`` to be received)
says so to the pool, at most once a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from governance import forksafe
from governance.policy.engine import Policy
from governance.policy.fairness import FairShare, in_flight_bound
from governance.store.errors import StoreUnavailable
from governance.store.pool import PREFETCH, Pools
from governance.store.state import StateStore

log = logging.getLogger("governance.fairness")

#: How long a process keeps what it read of a pool's saturation.
REFRESH_S = 0.25
#: A message received after waiting this long in the broker (or in a worker's prefetch) means
#: the pool is backlogged: tasks should wait for it in Redis instead.
BACKLOG_MS = 250
#: A process tells a pool it is backlogged at most this often.
SATURATE_EVERY_S = 1.0


def queue_of(app: Any, task_name: str, options: Mapping[str, Any]) -> str:
    """The queue a task published with ``options`` goes to: its ``queue`` option, its task's
    route, or the app's default queue."""
    queue = options.get("queue")
    if queue is None:
        task = app.tasks.get(task_name)
        queue = getattr(task, "queue", None)
    if queue is None:
        routes = app.amqp.router.route({}, task_name, (), {})
        queue = routes.get("queue")
    name = getattr(queue, "name", queue)
    return str(name or app.conf.task_default_queue)


def queue_of_delivery(task: Any) -> str:
    """The queue a delivery came from (its routing key: the queue's name with Celery's default
    routing), or the app's default queue."""
    info = getattr(task.request, "delivery_info", None) or {}
    return str(info.get("routing_key") or task.app.conf.task_default_queue)


class PoolView:
    """One process's view of the worker pools (see the module doc)."""

    def __init__(self, state: Callable[[], StateStore], policy: Callable[[], Policy]) -> None:
        self._state = state
        self._policy = policy
        self._lock = forksafe.lock()
        self._read_at: dict[str, float] = {}
        self._saturated: dict[str, bool] = {}
        self._capacity: dict[str, int] = {}
        self._said_at: dict[str, float] = {}
        self._mean_run_ms: dict[tuple[str, str], tuple[float, float | None]] = {}
        self._fair: tuple[Policy, FairShare] | None = None

    @property
    def fairness(self) -> FairShare:
        """The fair-share settings of the policy in force (a reload brings new ones)."""
        policy = self._policy()
        cached = self._fair
        if cached is None or cached[0] is not policy:
            cached = self._fair = (policy, FairShare.of(policy.config.fairness))
        return cached[1]

    @property
    def pools(self) -> Pools:
        return Pools(self._state(), self.fairness)

    def saturated(self, queue: str) -> bool:
        """Whether ``queue``'s pool is saturated, as read at most ``REFRESH_S`` ago (a store
        that does not answer reads as not saturated: the call that follows fails closed)."""
        self._refresh(queue)
        return self._saturated.get(queue, False)

    def capacity(self, queue: str) -> int:
        """``queue``'s pool capacity, as read at most ``REFRESH_S`` ago (0: unknown)."""
        self._refresh(queue)
        return self._capacity.get(queue, 0)

    def _refresh(self, queue: str) -> None:
        now = time.monotonic()
        if now - self._read_at.get(queue, -REFRESH_S) < REFRESH_S:
            return
        with self._lock:
            self._read_at[queue] = now
            try:
                glance = self.pools.glance([queue])[queue]
            except StoreUnavailable as exc:
                log.debug("could not read the pool of %s: %s", queue, exc)
                self._saturated[queue], self._capacity[queue] = False, 0
                return
            self._saturated[queue], self._capacity[queue] = glance.saturated, glance.capacity

    def in_flight_bound(self, queue: str, tenant: str) -> int:
        """How many of ``tenant``'s tasks may be in ``queue``'s broker or running before the
        next waits for the pool from publication: the pool's capacity plus the prefetch, or plus
        ``fairness.slack`` of the tenant's estimated work per pool process, whichever is more
        (the bound the pool keeps its dispatches within, see ``fairness.in_flight_bound``). The
        tenant's mean run time is read at most every ``REFRESH_S``."""
        now = time.monotonic()
        key = (queue, tenant)
        cached = self._mean_run_ms.get(key)
        if cached is None or now - cached[0] >= REFRESH_S:
            try:
                mean = self.pools.mean_run_ms(queue, tenant)
            except StoreUnavailable as exc:
                log.debug("could not read the mean run time of %s on %s: %s", tenant, queue, exc)
                mean = None
            cached = self._mean_run_ms[key] = (now, mean)
        fair = self.fairness
        mean_ms = cached[1] if cached[1] is not None else fair.default_run_ms
        return in_flight_bound(self.capacity(queue), PREFETCH, fair.slack_ms, mean_ms)

    def noted(self, queue: str, saturated: bool) -> None:
        """What a call to the pool said of it (fresher than the cached read)."""
        self._saturated[queue] = saturated
        self._read_at[queue] = time.monotonic()

    def backlogged(self, queue: str, queued_ms: int | None) -> None:
        """A message of ``queue`` waited ``queued_ms`` to be received: past ``BACKLOG_MS``, the
        pool is told it is saturated (at most once a second per process), so tasks wait for it
        in Redis instead of the broker."""
        if queued_ms is None or queued_ms < BACKLOG_MS or self._saturated.get(queue):
            return
        now = time.monotonic()
        if now - self._said_at.get(queue, -SATURATE_EVERY_S) < SATURATE_EVERY_S:
            return
        self._said_at[queue] = now
        try:
            grant = self.pools.dispatch(queue, saturate=True, give=False)
        except StoreUnavailable as exc:
            log.debug("could not tell the pool of %s it is backlogged: %s", queue, exc)
            return
        self.noted(queue, grant.saturated)
        log.info("the worker pool of %s is saturated (a message waited %d ms)", queue, queued_ms)
