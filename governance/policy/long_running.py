"""Controls for long agentic runs (wall time, discovery fan-out, cost alert, idle timeout, step
loops).

The presets are the seed's LongRunningExecutionPolicy presets, value for value; `standard` is the
default when a deployment says nothing, as in the seed. The seed keeps a run's wall-time limit
elsewhere (its ResourceLimits, checked first before every step, with a grace of 1 s); here it
is a field of the same presets: 2 h for `standard`, 24 h for `extended`, none for the others.

``cost_alert_usd`` is the seed's ``cost_alert_threshold_usd``: "when exceeded, execution pauses
for approval". A run whose cost has reached it has its next actions held for the tenant's
reviewers; an approval lets the run go on up to the next threshold. A hard cost limit of a run
is a budget (``budgets: [{period: run, cost_usd: ...}]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class LongRunningLimits:
    """Limits of one run; None switches a control off."""

    max_discovered_steps: int | None = None
    max_discovery_depth: int | None = None
    cost_alert_usd: float | None = None
    idle_timeout_s: int | None = None
    max_same_step_repetitions: int | None = None
    max_wall_time_s: float | None = None
    wall_time_grace_s: float = 1.0


PRESETS: MappingProxyType[str, LongRunningLimits] = MappingProxyType(
    {
        # ~30 min idle timeout, balanced limits for typical long runs.
        "standard": LongRunningLimits(50, 5, 5.0, 1800, 3, max_wall_time_s=7200),
        # ~4 h, for complex supervised workflows.
        "extended": LongRunningLimits(300, 10, 50.0, 14400, 5, max_wall_time_s=86400),
        # No discovery limits, but the cost alert and a 24 h idle timeout stay as a safety net.
        "unlimited": LongRunningLimits(None, None, 100.0, 86400, None),
        # Everything off: use with care.
        "disabled": LongRunningLimits(None, None, None, None, None),
    }
)
DEFAULT_PRESET = "standard"
