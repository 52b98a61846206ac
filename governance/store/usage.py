"""Usage reads for the CLI and metrics, and the long-running checks of a run.

Snapshots are read in one round trip (a pipeline over keys of one tenant's slot) and show both
what was used and what tasks in flight have reserved, so operators see the same numbers that
admission decides on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from governance.policy.limits import LimitResult, ViolationType, check_limit
from governance.policy.long_running import LongRunningLimits
from governance.policy.usage import Usage
from governance.store.keys import Period, TenantKeys, period_label
from governance.store.state import StateStore


@dataclass(frozen=True)
class UsageSnapshot:
    """Usage of one window (a run, a day or a month of one tenant) at one moment."""

    tenant: str
    period: Period
    label: str
    used: Usage
    reserved: Usage
    active_leases: int
    discovered_steps: int
    max_discovery_depth: int
    most_repeated_step: int
    started_at_ms: int | None
    last_activity_ms: int | None
    #: The run's cost alert threshold reviewers moved it to (micro-USD), and whether they
    #: rejected the run at its alert.
    alert_at_micro: int | None = None
    stopped_at_cost_alert: bool = False

    @property
    def total_tokens(self) -> int:
        return self.used.input_tokens + self.used.output_tokens

    @property
    def wall_time_ms(self) -> int:
        """From the first admission to the last activity of the window."""
        if self.started_at_ms is None or self.last_activity_ms is None:
            return 0
        return self.last_activity_ms - self.started_at_ms

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view, for ``govctl usage --json`` and metrics."""
        return {
            "tenant": self.tenant,
            "period": self.period.value,
            "window": self.label,
            "steps": self.used.steps,
            "tool_calls": self.used.tool_calls,
            "input_tokens": self.used.input_tokens,
            "output_tokens": self.used.output_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": self.used.cost_usd,
            "reserved_tokens": self.reserved.input_tokens + self.reserved.output_tokens,
            "reserved_cost_usd": self.reserved.cost_usd,
            "active_leases": self.active_leases,
            "discovered_steps": self.discovered_steps,
            "max_discovery_depth": self.max_discovery_depth,
            "most_repeated_step": self.most_repeated_step,
            "wall_time_ms": self.wall_time_ms,
        }


def _int(fields: dict[bytes, bytes], name: str) -> int:
    raw = fields.get(name.encode())
    return int(raw) if raw is not None else 0


def _opt_int(fields: dict[bytes, bytes], name: str) -> int | None:
    raw = fields.get(name.encode())
    return int(raw) if raw is not None else None


def _usage(fields: dict[bytes, bytes], prefix: str = "") -> Usage:
    return Usage(
        steps=_int(fields, prefix + "steps"),
        tool_calls=_int(fields, prefix + "tool_calls"),
        input_tokens=_int(fields, prefix + "input_tokens"),
        output_tokens=_int(fields, prefix + "output_tokens"),
        cost_micro_usd=_int(fields, prefix + "cost"),
    )


def read_usage(
    state: StateStore,
    tenant: str,
    period: Period,
    *,
    run: str = "",
    now: datetime | None = None,
) -> UsageSnapshot:
    """Usage of ``tenant`` in the ``period`` window containing ``now`` (or of ``run``)."""
    if period is Period.RUN and not run:
        raise ValueError("a run id is needed to read run usage")
    keys = TenantKeys(tenant)
    label = period_label(period, run, now)
    window = keys.window(period, label)
    now_ms = int(time.time() * 1000)

    def read() -> list[object]:
        pipe = state.client.pipeline(transaction=False)
        pipe.hgetall(window)
        pipe.zcount(keys.leases, now_ms, "+inf")
        if period is Period.RUN:
            pipe.hvals(keys.step_repetitions(run))
        return list(pipe.execute())

    replies = state.run("usage read", read)
    fields: dict[bytes, bytes] = replies[0]  # type: ignore[assignment]
    repeated = replies[2] if period is Period.RUN else []
    return UsageSnapshot(
        tenant=tenant,
        period=period,
        label=label,
        used=_usage(fields),
        reserved=_usage(fields, "r_"),
        active_leases=int(replies[1]),  # type: ignore[call-overload]
        discovered_steps=_int(fields, "discovered"),
        max_discovery_depth=_int(fields, "max_depth"),
        most_repeated_step=max((int(v) for v in repeated), default=0),  # type: ignore[attr-defined]
        started_at_ms=_opt_int(fields, "started_ms"),
        last_activity_ms=_opt_int(fields, "last_ms"),
        alert_at_micro=_opt_int(fields, "alert_at"),
        stopped_at_cost_alert=_int(fields, "alert_stop") > 0,
    )


def stop_run_at_cost_alert(state: StateStore, tenant: str, run: str) -> None:
    """Reviewers rejected ``run`` at its cost alert: its later steps end rejected at admission
    (the run window's ``alert_stop``, read by the admission script)."""
    window = TenantKeys(tenant).windows(run)[0]
    state.run("run stop", lambda: state.client.hset(window, "alert_stop", 1))


def long_running_checks(
    snapshot: UsageSnapshot,
    limits: LongRunningLimits,
    *,
    warning_threshold_pct: int = 80,
    now_ms: int | None = None,
) -> dict[ViolationType, LimitResult]:
    """The seed's long-running checks of a run: where each stands against its limit now."""
    if snapshot.period is not Period.RUN:
        raise ValueError("long-running checks apply to a run's usage")
    results: dict[ViolationType, LimitResult] = {}
    threshold = warning_threshold_pct
    if limits.max_discovered_steps is not None:
        results[ViolationType.discovered_step_limit] = check_limit(
            ViolationType.discovered_step_limit,
            snapshot.discovered_steps,
            limits.max_discovered_steps,
            warning_threshold_pct=threshold,
        )
    if limits.max_discovery_depth is not None:
        results[ViolationType.discovery_depth_limit] = check_limit(
            ViolationType.discovery_depth_limit,
            snapshot.max_discovery_depth,
            limits.max_discovery_depth,
            warning_threshold_pct=threshold,
        )
    current_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if limits.max_wall_time_s is not None and snapshot.started_at_ms is not None:
        results[ViolationType.wall_time_limit] = check_limit(
            ViolationType.wall_time_limit,
            max(0, current_ms - snapshot.started_at_ms),
            round(limits.max_wall_time_s * 1000),
            warning_threshold_pct=threshold,
        )
    if limits.cost_alert_usd is not None:
        alert_usd = max(limits.cost_alert_usd, (snapshot.alert_at_micro or 0) / 1_000_000)
        results[ViolationType.cost_alert] = check_limit(
            ViolationType.cost_alert,
            snapshot.used.cost_usd,
            alert_usd,
            warning_threshold_pct=threshold,
        )
    if limits.idle_timeout_s is not None and snapshot.last_activity_ms is not None:
        idle_s = max(0, current_ms - snapshot.last_activity_ms) // 1000
        results[ViolationType.idle_timeout] = check_limit(
            ViolationType.idle_timeout,
            idle_s,
            int(limits.idle_timeout_s),
            warning_threshold_pct=threshold,
        )
    if limits.max_same_step_repetitions is not None:
        results[ViolationType.same_step_loop] = check_limit(
            ViolationType.same_step_loop,
            snapshot.most_repeated_step,
            limits.max_same_step_repetitions,
            warning_threshold_pct=threshold,
        )
    return results
