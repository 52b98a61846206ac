"""``govctl held``: list, show, approve, reject and expire held actions.

An approval-tier action waits in the held store until the tenant's quorum of distinct reviewers
approves it (it is then published again, and runs once), a reviewer rejects it (its result
becomes FAILURE with the reason), or its hold expires (``govctl held expire``, and every worker's
sweep, reject it as expired).
"""

from __future__ import annotations

import getpass
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag

if TYPE_CHECKING:
    from governance.store.held import HeldStatus, HeldTask

app = typer.Typer(
    help="Held actions waiting for reviewers: list, show, approve, reject, expire.",
    no_args_is_help=True,
)

STATUSES = "held, suggested, released, rejected, expired"

Reviewer = Annotated[
    str | None,
    typer.Option(
        "--reviewer",
        "-r",
        help="Who decides; recorded in the task and the audit log. Default: the OS user.",
        show_default=False,
    ),
]


def _status(value: str) -> HeldStatus:
    from governance.store.held import HeldStatus

    try:
        return HeldStatus(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not one of {STATUSES}", param_hint="--status"
        ) from None


def _reviewer(value: str | None) -> str:
    if value:
        return value
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise typer.BadParameter(
            "the OS user is unknown here: pass --reviewer NAME", param_hint="--reviewer"
        ) from None


def _row(task: HeldTask) -> list[str]:
    expires = output.relative(task.expires_ms) if task.status.value == "held" else ""
    return [
        task.task_id,
        task.tenant,
        task.agent,
        task.run,
        task.user,
        task.action_name,
        task.status.value,
        str(task.approvals),
        output.when(task.requested_ms),
        expires,
    ]


@app.command("list")
def list_(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant (default: all).")
    ] = None,
    status: Annotated[str, typer.Option("--status", "-s", help=f"One of {STATUSES}.")] = "held",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="Page size.")] = 50,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue a listing (printed after a page).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List held tasks, oldest first, a page at a time."""
    from governance.cli.paging import list_all, list_tenant

    wanted = _status(status)
    approvals = context.approvals()
    if tenant:
        listing = list_tenant(approvals.store, tenant, wanted, limit, cursor)
    else:
        tenants = approvals.store.tenants(context.runtime().policy.tenant_names)
        listing = list_all(approvals.store, tenants, wanted, limit, cursor)
    if as_json:
        output.emit_json(
            {
                "tasks": [t.as_dict() for t in listing.tasks],
                "next_cursor": listing.next_cursor,
                "total": listing.total,
            }
        )
        return
    columns = ("task", "tenant", "agent", "run", "user", "action", "status", "approvals")
    shown = output.table(
        *columns,
        "requested",
        "expires",
        title=f"{wanted.value} tasks" + (f" of {tenant}" if tenant else ""),
        caption=f"{len(listing.tasks)} shown of {listing.total}",
    )
    for task in listing.tasks:
        output.add_row(shown, *_row(task))
    output.show(shown)
    if listing.next_cursor:
        again = ["govctl held list", f"--status {wanted.value}", f"--limit {limit}"]
        if tenant:
            again.insert(1, f"--tenant {tenant}")
        output.note(f"more: {' '.join(again)} --cursor {listing.next_cursor}")


@app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    as_json: JsonFlag = False,
) -> None:
    """Show one held task: the call, who asked, why it is held, and the decisions so far."""
    task = context.approvals().find(task_id)
    if as_json:
        output.emit_json(task.as_dict())
        return
    _show_task(task)


def _show_task(task: HeldTask) -> None:
    import json

    rows: list[tuple[str, Any]] = [
        ("task", task.task_id),
        ("status", task.status.value),
        ("tenant", task.tenant),
        ("agent", task.agent),
        ("run", task.run),
        ("requested by", task.user or "(unknown)"),
        ("task name", task.task_name),
        ("action", f"{task.action_name} ({task.action_class})"),
        ("call", json.dumps(task.action.get("input", task.kwargs), sort_keys=True)),
        ("tier", task.tier),
        ("reason", task.reason),
        ("requested", f"{output.when(task.requested_ms)} ({output.relative(task.requested_ms)})"),
        ("approvals", task.approvals),
    ]
    if task.status.value == "held":
        rows.insert(
            -1, ("expires", f"{output.when(task.expires_ms)} ({output.relative(task.expires_ms)})")
        )
    if task.reheld:
        rows.append(("held again", f"{task.reheld} time(s)"))
    output.show(output.fields_table(rows, title=f"held task {task.task_id}"))
    if task.decisions:
        decisions = output.table("when", "verdict", "reviewer", "reason", title="decisions")
        for d in task.decisions:
            output.add_row(decisions, output.when(d.at_ms), d.verdict, d.reviewer, d.reason)
        output.show(decisions)


@app.command("approve")
def approve(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    reviewer: Reviewer = None,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded.")] = "",
    grant: Annotated[
        str | None,
        typer.Option(
            "--grant",
            help="Also let the agent take this action without approval for DURATION "
            "(e.g. 30m, 8h, 2d): an expiring grant.",
            metavar="DURATION",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Approve a held task; with the quorum of reviewers it is released and runs once.

    Until the tenant's quorum of distinct reviewers has approved, the approval is recorded and
    the task stays held. A reviewer may not approve their own request (unless the tenant allows
    it), nor approve twice.
    """
    grant_for = _duration(grant) if grant is not None else None
    who = _reviewer(reviewer)
    outcome = context.approvals().approve(task_id, who, reason, grant_for=grant_for)
    if as_json:
        output.emit_json(
            {
                "task_id": task_id,
                "outcome": outcome.outcome,
                "reviewer": who,
                "approvals": outcome.approvals,
                "quorum": outcome.quorum,
                "grant": outcome.grant.model_dump(mode="json") if outcome.grant else None,
                "task": outcome.task.as_dict(),
            }
        )
        return
    count = f"{outcome.approvals} of {outcome.quorum} approvals"
    if outcome.outcome == "released":
        output.show(f"released task {task_id}: approved by {who} ({count}); it runs once now")
    else:
        waiting = outcome.quorum - outcome.approvals
        output.show(
            f"recorded {who}'s approval of task {task_id} ({count}); still held until "
            f"{waiting} more reviewer(s) approve"
        )
    if outcome.grant is not None:
        g = outcome.grant
        output.show(f"granted {g.action} to agent {g.agent} until {g.until.isoformat()}")


def _duration(value: str) -> timedelta:
    from governance.policy.duration import parse_duration

    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--grant") from None
    if duration <= timedelta(0):
        raise typer.BadParameter("a grant must last longer than 0", param_hint="--grant")
    return duration


@app.command("reject")
def reject(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required); recorded.")],
    reviewer: Reviewer = None,
    as_json: JsonFlag = False,
) -> None:
    """Reject a held task: it never runs, and its result becomes FAILURE with the reason."""
    if not reason.strip():
        raise typer.BadParameter("a rejection needs a reason", param_hint="--reason")
    who = _reviewer(reviewer)
    task = context.approvals().reject(task_id, who, reason)
    if as_json:
        output.emit_json({"task_id": task_id, "outcome": "rejected", "task": task.as_dict()})
        return
    output.show(f"rejected task {task_id} ({who}): {reason}")


@app.command("expire")
def expire(as_json: JsonFlag = False) -> None:
    """Reject, as expired, every held task whose hold has run out (workers sweep too)."""
    expired = context.approvals().expire_due()
    if as_json:
        output.emit_json({"expired": [t.as_dict() for t in expired]})
        return
    if not expired:
        output.show("no held task has expired")
        return
    shown = output.table("task", "tenant", "agent", "action", "expired at", title="expired")
    for task in expired:
        output.add_row(
            shown,
            task.task_id,
            task.tenant,
            task.agent,
            task.action_name,
            output.when(task.expires_ms),
        )
    output.show(shown)
    output.show(f"expired {len(expired)} held task(s)")
