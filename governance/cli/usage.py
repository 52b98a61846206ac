"""``govctl usage``: what tenants (and runs) used and have reserved, against their budgets.

The numbers are the ones admission decides on: used, plus reserved by tasks in flight. For a run,
the long-running checks (discovered steps, depth, cost alert, idle time, repeated steps) show
where it stands against its limits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag, TenantFilter

if TYPE_CHECKING:
    from governance.policy.limits import LimitResult
    from governance.policy.tenant import TenantPolicy
    from governance.store.usage import UsageSnapshot

#: Table columns: (heading, snapshot field, budget field that limits it).
COLUMNS = (
    ("steps", "steps", "steps"),
    ("tool calls", "tool_calls", "tool_calls"),
    ("tokens", "total_tokens", "tokens"),
    ("input", "input_tokens", "input_tokens"),
    ("output", "output_tokens", "output_tokens"),
    ("cost $", "cost_usd", "cost_usd"),
)


def usage(
    tenant: TenantFilter = None,
    run: Annotated[
        str | None, typer.Option("--run", help="Also this run's usage and long-running checks.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Usage today, this month and (with --run) of one run: used, reserved, budget, leases."""
    from governance.store.keys import Period
    from governance.store.usage import long_running_checks, read_usage

    if run and not tenant:
        raise typer.BadParameter("a run belongs to a tenant: pass --tenant too", param_hint="--run")
    rt = context.runtime()
    policy = rt.policy
    context.check_tenant(policy, tenant)
    names = [tenant] if tenant else list(policy.tenant_names)
    snapshots: list[tuple[UsageSnapshot, TenantPolicy]] = []
    for name in names:
        tp = policy.tenant(name)
        assert tp is not None
        for period in (Period.DAY, Period.MONTH):
            snapshots.append((read_usage(rt.state, name, period), tp))
        if run:
            snapshots.append((read_usage(rt.state, name, Period.RUN, run=run), tp))
    checks: list[dict[str, Any]] = []
    if run and tenant:
        snap, tp = snapshots[-1]
        results = long_running_checks(
            snap, tp.long_running, warning_threshold_pct=tp.warning_threshold_pct
        )
        checks = [_check(kind.value, result) for kind, result in results.items()]
    rows = [_with_budget(snap, tp) for snap, tp in snapshots]
    if as_json:
        data: dict[str, Any] = {"usage": rows}
        if run:
            data["long_running"] = checks
        output.emit_json(data)
        return
    _print(rows, checks, run)


def _check(kind: str, result: LimitResult) -> dict[str, Any]:
    from governance.policy.limits import Blocked, NearLimit

    if isinstance(result, Blocked | NearLimit):
        state = "blocked" if isinstance(result, Blocked) else "warning"
        return {
            "check": kind,
            "state": state,
            "current": result.current,
            "limit": result.limit,
            "message": result.message,
        }
    return {"check": kind, "state": "ok", "current": None, "limit": None, "message": "within"}


def _with_budget(snap: UsageSnapshot, tp: TenantPolicy) -> dict[str, Any]:
    budget = tp.budget(snap.period.value)
    row = snap.as_dict()
    row["budget"] = budget.model_dump(exclude={"period"}, exclude_none=True) if budget else None
    return row


def _cell(row: dict[str, Any], field: str, limit_field: str) -> str:
    value = row[field]
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    limit = (row["budget"] or {}).get(limit_field)
    if limit is None:
        return text
    shown = f"{limit:.2f}" if isinstance(limit, float) else str(limit)
    return f"{text} / {shown}"


def _print(rows: list[dict[str, Any]], checks: list[dict[str, Any]], run: str | None) -> None:
    shown = output.table(
        "tenant",
        "window",
        *(c[0] for c in COLUMNS),
        "reserved tokens",
        "reserved $",
        "running",
        title="usage (used / budget)",
    )
    for row in rows:
        output.add_row(
            shown,
            row["tenant"],
            f"{row['period']} {row['window']}",
            *(_cell(row, field, limit) for _, field, limit in COLUMNS),
            row["reserved_tokens"],
            f"{row['reserved_cost_usd']:.4f}",
            row["active_leases"],
        )
    output.show(shown)
    if run:
        lr = output.table("check", "state", "current", "limit", "message", title=f"run {run}")
        for c in checks:
            output.add_row(lr, c["check"], c["state"], c["current"], c["limit"], c["message"])
        if not checks:
            output.add_row(lr, "(long-running checks are disabled for this tenant)", "", "", "", "")
        output.show(lr)
