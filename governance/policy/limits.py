"""Checking a usage figure against a limit: allowed, a warning near the limit, or blocked.

Semantics and messages follow the seed's enforcement module: over the limit blocks with
"<type> exceeded: <current> / <limit> (<pct>%)", at or above the warning threshold warns with
"<type> at <pct>%: <current> / <limit>". Cost figures are USD and print as dollars.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

Number = int | float


class ViolationType(StrEnum):
    """Which limit was hit; the value is what audit events and messages show."""

    step_limit = "step_limit"
    token_limit = "token_limit"
    input_token_limit = "input_token_limit"
    output_token_limit = "output_token_limit"
    tool_call_limit = "tool_call_limit"
    cost_limit = "cost_limit"
    concurrency_limit = "concurrency_limit"
    rate_limit = "rate_limit"
    wall_time_limit = "wall_time_limit"
    discovered_step_limit = "discovered_step_limit"
    discovery_depth_limit = "discovery_depth_limit"
    idle_timeout = "idle_timeout"
    same_step_loop = "same_step_loop"
    cooldown = "cooldown"
    run_concurrency_limit = "run_concurrency_limit"
    cost_alert = "cost_alert"
    step_timeout = "step_timeout"
    #: The tenant is paused by an operator (govctl tenants pause): its tasks wait.
    paused = "paused"
    #: The worker pool of the task's queue is saturated: it waits for its tenant's fair share.
    pool_saturated = "pool_saturated"


def percent_of(current: Number, limit: Number) -> int:
    """Whole percent of `limit` used, rounded down; exact for ints (29 of 100 is 29, not 28)."""
    if limit == 0:
        return 0 if current == 0 else 100
    if isinstance(current, int) and isinstance(limit, int):
        return current * 100 // limit
    return int(current * 100 / limit)


def format_amount(kind: ViolationType, value: Number) -> str:
    """A figure as messages print it: dollars for cost, else the plain number."""
    if kind in (ViolationType.cost_limit, ViolationType.cost_alert):
        return f"${value:.2f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _figures(kind: ViolationType, current: Number, limit: Number) -> str:
    return f"{format_amount(kind, current)} / {format_amount(kind, limit)}"


@dataclass(frozen=True)
class Violation:
    """A limit that was exceeded; `message` is derived from the figures unless given."""

    type: ViolationType
    current: Number
    limit: Number
    message: str = ""

    def __post_init__(self) -> None:
        if not self.message:
            pct = "limit is 0" if self.limit == 0 else f"{percent_of(self.current, self.limit)}%"
            text = f"{self.type} exceeded: {_figures(self.type, self.current, self.limit)} ({pct})"
            object.__setattr__(self, "message", text)


@dataclass(frozen=True)
class LimitWarning:
    """A limit that is close to being reached (at or above the warning threshold)."""

    type: ViolationType
    current: Number
    limit: Number
    percent: int = -1
    message: str = ""

    def __post_init__(self) -> None:
        if self.percent < 0:
            object.__setattr__(self, "percent", percent_of(self.current, self.limit))
        if not self.message:
            figures = _figures(self.type, self.current, self.limit)
            object.__setattr__(self, "message", f"{self.type} at {self.percent}%: {figures}")


@dataclass(frozen=True)
class Allowed:
    """Within the limit and below the warning threshold."""

    @property
    def is_allowed(self) -> Literal[True]:
        return True

    @property
    def is_blocked(self) -> Literal[False]:
        return False


@dataclass(frozen=True)
class NearLimit:
    """Allowed, but at or above the warning threshold (the seed called it ``Warning``, which
    shadows a builtin; that name stays importable from this module, deprecated, for one
    release)."""

    warning: LimitWarning

    @property
    def is_allowed(self) -> Literal[True]:
        return True

    @property
    def is_blocked(self) -> Literal[False]:
        return False

    @property
    def type(self) -> ViolationType:
        return self.warning.type

    @property
    def current(self) -> Number:
        return self.warning.current

    @property
    def limit(self) -> Number:
        return self.warning.limit

    @property
    def percent(self) -> int:
        return self.warning.percent

    @property
    def message(self) -> str:
        return self.warning.message


@dataclass(frozen=True)
class Blocked:
    """Over the limit: the action must not proceed now."""

    violation: Violation

    @property
    def is_allowed(self) -> Literal[False]:
        return False

    @property
    def is_blocked(self) -> Literal[True]:
        return True

    @property
    def type(self) -> ViolationType:
        return self.violation.type

    @property
    def current(self) -> Number:
        return self.violation.current

    @property
    def limit(self) -> Number:
        return self.violation.limit

    @property
    def message(self) -> str:
        return self.violation.message


LimitResult = Allowed | NearLimit | Blocked


def check_limit(
    type: ViolationType,
    current: Number,
    limit: Number | None,
    warning_threshold_pct: int = 80,
) -> LimitResult:
    """Compare `current` (usage including the action about to run) with `limit`.

    Blocked when current > limit; NearLimit when the whole percent used is at or above the
    threshold (so exactly at it warns); else Allowed. A limit of 0 allows nothing but an idle 0;
    a limit of None means no limit.
    """
    if current < 0:
        raise ValueError(f"current must be >= 0 (got {current})")
    if limit is None:
        return Allowed()
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (got {limit})")
    if current > limit:
        return Blocked(Violation(type, current, limit))
    if limit == 0:
        return Allowed()
    pct = percent_of(current, limit)
    if pct >= warning_threshold_pct:
        return NearLimit(LimitWarning(type, current, limit, pct))
    return Allowed()


def __getattr__(name: str) -> Any:
    # `Warning`, the seed's name of NearLimit, shadows a builtin: deprecated for one release.
    if name == "Warning":
        warnings.warn(
            "governance.policy.limits.Warning is deprecated: use NearLimit",
            DeprecationWarning,
            stacklevel=2,
        )
        return NearLimit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
