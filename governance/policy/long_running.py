"""Controls for long agentic runs (discovery fan-out, cost alert, idle timeout, step loops).

The presets are the seed's LongRunningExecutionPolicy presets, value for value; `standard` is the
default when a deployment says nothing, as in the seed.
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


PRESETS: MappingProxyType[str, LongRunningLimits] = MappingProxyType(
    {
        # ~30 min idle timeout, balanced limits for typical long runs.
        "standard": LongRunningLimits(50, 5, 5.0, 1800, 3),
        # ~4 h, for complex supervised workflows.
        "extended": LongRunningLimits(300, 10, 50.0, 14400, 5),
        # No discovery limits, but the cost alert and a 24 h idle timeout stay as a safety net.
        "unlimited": LongRunningLimits(None, None, 100.0, 86400, None),
        # Everything off: use with care.
        "disabled": LongRunningLimits(None, None, None, None, None),
    }
)
DEFAULT_PRESET = "standard"
