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
    from governance.integration.tenant_overview import removed_with_open_tasks, tenant_overview

    rt = context.runtime()
    policy = rt.policy
    context.check_tenant(policy, tenant)
    grace_ms = round(rt.settings.reconcile_after_s * 1000)
    overview = tenant_overview(rt, [tenant] if tenant else None)
    late: list[dict[str, Any]] = []
    if overdue:
        for row in overview:
            late += [
                {"tenant": row.tenant, **t}
                for t in rt.ledger.overdue(row.tenant, overdue_after_ms=grace_ms)
            ]
    removed = [] if tenant else removed_with_open_tasks(rt)
    if as_json:
        data: dict[str, Any] = {
            "tenants": [row.as_dict() for row in overview],
            "removed": [r.as_dict() for r in removed],
        }
        if overdue:
            data["overdue"] = late
        output.emit_json(data)
        return
    shown = output.table(
        "tenant", "running", "waiting", "oldest wait", "share", "weight", "paused", "open",
        "overdue", "republished",
        title="governed tasks",
    )  # fmt: skip
    for row in overview:
        output.add_row(
            shown,
            row.tenant,
            row.running,
            row.waiting,
            "" if row.oldest_wait_s is None else output.span(row.oldest_wait_s),
            f"{row.share_last_minute:.0%}",
            f"{row.weight:g}" + ("*" if row.weight_overridden else ""),
            "yes" if row.paused else "",
            row.open,
            row.overdue,
            row.republished,
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
