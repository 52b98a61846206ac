"""``govctl status``: per tenant, what runs, what waits, and whether the ledger accounts for it.

``running`` are tasks holding a concurrency lease, ``waiting`` the tenant's wait list (and how
long its oldest task has waited), ``share`` its share of the worker time its tenants used over
the last minute, ``weight`` its share of a saturated pool relative to the others' (an
operator's override shown with ``*``), ``paused`` whether an operator paused it, ``open`` the
ledger's tasks that are not done yet (queued, parked, waiting, running), ``overdue`` those nobody
looked at in time: neither done nor accounted for, which should always be 0 (the reconciler
publishes them again), and ``republished`` how often the reconciler had to. ``--overdue`` lists
the overdue tasks.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag, TenantFilter


def status(
    tenant: TenantFilter = None,
    overdue: Annotated[
        bool, typer.Option("--overdue", help="Also list the overdue tasks, one per line.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Running and waiting tasks per tenant, the oldest wait, and the ledger's open tasks."""
    rt = context.runtime()
    policy = rt.policy
    context.check_tenant(policy, tenant)
    names = [tenant] if tenant else list(policy.tenant_names)
    grace_ms = round(rt.settings.reconcile_after_s * 1000)
    rows: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    from governance.store.control import Controls

    controls = Controls(rt.state, rt.audit_log)
    for name in names:
        row = rt.ledger.status(name, overdue_after_ms=grace_ms).as_dict()
        row["republished"] = rt.ledger.republished(name)
        control = controls.read(name)
        tenant_policy = policy.tenant(name)
        row["weight"] = control.weight or (tenant_policy.weight if tenant_policy else 1.0)
        row["weight_overridden"] = control.weight is not None
        row["concurrency_override"] = control.concurrency
        rows.append(row)
    total_ms = sum(r["worker_s_last_minute"] for r in rows)
    for row in rows:
        row["share_last_minute"] = (
            round(row["worker_s_last_minute"] / total_ms, 3) if total_ms else 0.0
        )
        if overdue:
            late += [
                {"tenant": name, **t} for t in rt.ledger.overdue(name, overdue_after_ms=grace_ms)
            ]
    removed = [] if tenant else rt.removed_tenants.removed(policy.tenant_names)
    removed = [r for r in removed if r.open or r.held]
    if as_json:
        data: dict[str, Any] = {"tenants": rows, "removed": [r.as_dict() for r in removed]}
        if overdue:
            data["overdue"] = late
        output.emit_json(data)
        return
    shown = output.table(
        "tenant", "running", "waiting", "oldest wait", "share", "weight", "paused", "open",
        "overdue", "republished",
        title="governed tasks",
    )  # fmt: skip
    for row in rows:
        oldest = row["oldest_wait_s"]
        output.add_row(
            shown,
            row["tenant"],
            row["running"],
            row["waiting"],
            "" if oldest is None else output.span(oldest),
            f"{row['share_last_minute']:.0%}",
            f"{row['weight']:g}" + ("*" if row["weight_overridden"] else ""),
            "yes" if row["paused"] else "",
            row["open"],
            row["overdue"],
            row["republished"],
        )
    output.show(shown)
    if removed:
        gone = output.table(
            "tenant", "open", "held", "tasks end", title="removed from the policy, with open tasks"
        )
        for r in removed:
            ends = "when noticed" if r.ends_at_ms is None else output.when(r.ends_at_ms)
            output.add_row(gone, r.tenant, r.open, r.held, ends)
        output.show(gone)
        output.show("(govctl tenants end NAME ends them now; back in the policy, they go on)")
    if overdue:
        listing = output.table("tenant", "task", "where", "since", title="overdue tasks")
        for task in late:
            output.add_row(
                listing,
                task["tenant"],
                task["task_id"],
                task["where"],
                output.when(task["since_ms"]),
            )
        output.show(listing if late else "no overdue task: every task is accounted for")
