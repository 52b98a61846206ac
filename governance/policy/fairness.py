"""Fair dispatch: how a saturated worker pool is shared between tenants, as pure arithmetic.

When the workers of a queue are all busy, the tasks that cannot run wait in their tenants' wait
lists (never in the broker), and each unit of freed capacity goes to the tenant furthest below
its weighted fair share: start-time fair queueing over the tenants with waiting work. A tenant
that starts to wait gets the start tag ``max(V, F)`` (the pool's virtual time, or where its last
share ended); the tenant with the smallest start tag is served next, its tag moving on by the
estimated cost of what it was given divided by its weight; the pool's virtual time follows the
tag of the tenant served. What a tenant is charged is what ``fairness.by`` says: the worker time
its tasks use (the default: a tenant of long calls cannot crowd out one of short calls), its
tasks, or its tokens (a tool call counting ``tool_call_tokens``). The cost is estimated when the
tasks are dispatched (the tenant's running mean, else ``default_estimate``) and corrected by
what they actually cost when they settle.

The same arithmetic runs, atomically, in the pool's Lua script (``store/scripts/
pool_dispatch.lua``); this module gives the parameters it is called with, and is what the tests
check the script against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from governance.policy.config import FairnessSettings

#: The weight of a running mean's newest sample (an exponentially weighted mean).
MEAN_ALPHA = 0.2


@dataclass(frozen=True)
class FairShare:
    """The policy's fair-dispatch settings, in the units the pool counts in (ms, tokens)."""

    by: str = "time"
    slack_ms: int = 100
    default_run_ms: int = 1000
    tool_call_tokens: int = 1000
    capacity: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, settings: FairnessSettings) -> FairShare:
        return cls(
            by=settings.by,
            slack_ms=max(1, round(settings.slack.total_seconds() * 1000)),
            default_run_ms=max(1, round(settings.default_estimate.total_seconds() * 1000)),
            tool_call_tokens=settings.tool_call_tokens,
            capacity=MappingProxyType(dict(settings.capacity)),
        )

    def cost(self, *, run_ms: float, tokens: int, tool_call: bool) -> float:
        """What one settled task is charged: its worker time (ms), 1 (a task), or its tokens
        (a tool call at least ``tool_call_tokens``)."""
        if self.by == "tasks":
            return 1.0
        if self.by == "tokens":
            return float(max(tokens, self.tool_call_tokens if tool_call else 1))
        return max(1.0, float(run_ms))

    @property
    def default_cost(self) -> float:
        """What a task of a tenant with no history is assumed to cost."""
        if self.by == "tasks":
            return 1.0
        if self.by == "tokens":
            return float(self.tool_call_tokens)
        return float(self.default_run_ms)


def batch_size(slack_ms: int, mean_run_ms: float, free: int) -> int:
    """How many tasks one dispatch moves: about ``slack_ms`` of estimated work (short tasks in
    batches, long ones one by one), at least one, at most the ``free`` capacity."""
    if free <= 0:
        return 0
    return max(1, min(free, math.floor(slack_ms / max(mean_run_ms, 1.0))))


def in_flight_bound(capacity: int, prefetch: int, slack_ms: int, mean_run_ms: float) -> int:
    """How many dispatched tasks the pool lets be running or in the broker at once: its capacity
    plus the prefetch, or plus about ``slack_ms`` of estimated work per pool process, whichever
    is more."""
    slack_tasks = math.ceil(capacity * slack_ms / max(mean_run_ms, 1.0))
    return capacity + max(capacity * prefetch, slack_tasks)


def running_mean(previous: float | None, sample: float) -> float:
    """The running mean after ``sample`` (the first sample is the mean)."""
    if previous is None:
        return sample
    return previous + MEAN_ALPHA * (sample - previous)


def start_tag(virtual_time: float, finish: float) -> float:
    """A tenant that starts to wait is served from where its last share ended, never before the
    pool's virtual time (waiting earlier does not bank a share)."""
    return max(virtual_time, finish)


def finish_tag(start: float, cost: float, weight: float) -> float:
    """Where a tenant's share ends after being given ``cost`` of work at ``start``."""
    return start + cost / weight


def shares(worker_ms: Mapping[str, float]) -> dict[str, float]:
    """Each tenant's share of the worker time used (0..1)."""
    total = sum(worker_ms.values())
    return {t: (ms / total if total else 0.0) for t, ms in worker_ms.items()}
