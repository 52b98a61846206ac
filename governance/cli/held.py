"""``govctl held``: list, show, approve, reject and expire held actions.

An approval-tier action waits in the held store until the tenant's quorum of distinct reviewers
approves it (it is then published again, and runs once), a reviewer rejects it (its result
becomes FAILURE with the reason), or its hold expires (``govctl held expire``, and every worker's
sweep, reject it as expired).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.options import positive_duration
from governance.cli.output import JsonFlag

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from governance.integration.approvals.held_call import HeldCall
    from governance.store.held import HeldStatus, HeldTask

app = typer.Typer(
    help="Held actions waiting for reviewers: list, show, approve, reject, expire.",
    no_args_is_help=True,
)

STATUSES = "held, suggested, released, rejected, expired"

KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key",
        "-k",
        help="Your reviewer's private key file (from `govctl reviewers keygen`); default: "
        "GOVERNANCE_REVIEWER_KEY. The decision is signed with it, and your name comes from it.",
        show_default=False,
        dir_okay=False,
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


def _key(path: Path | None) -> Ed25519PrivateKey:
    """The reviewer's private key, from ``--key`` or ``GOVERNANCE_REVIEWER_KEY``."""
    from governance.policy.signing import load_private_key

    chosen = path or (
        Path(os.environ["GOVERNANCE_REVIEWER_KEY"])
        if os.environ.get("GOVERNANCE_REVIEWER_KEY")
        else None
    )
    if chosen is None:
        raise typer.BadParameter(
            "a decision is signed with your reviewer key: pass --key PATH or set "
            "GOVERNANCE_REVIEWER_KEY (make one with `govctl reviewers keygen NAME`)",
            param_hint="--key",
        )
    try:
        return load_private_key(chosen.read_bytes())
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {chosen}: {exc.strerror}", param_hint="--key"
        ) from None
    except ValueError as exc:
        raise typer.BadParameter(f"{chosen}: {exc}", param_hint="--key") from None


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
    reviewers = context.reviewers()
    context.check_tenant(context.runtime().policy, tenant)
    if tenant:
        listing = list_tenant(reviewers.store, tenant, wanted, limit, cursor)
    else:
        tenants = list(context.runtime().policy.tenant_names)
        listing = list_all(reviewers.store, tenants, wanted, limit, cursor)
    if as_json:
        output.emit_json(
            {
                "tasks": [_listed(t) for t in listing.tasks],
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


def _listed(task: HeldTask) -> dict[str, Any]:
    """A held task as every command prints it (listed, approved, rejected, expired): its
    secret-named values masked, ``*** (sha256:..., N chars)`` (``held show --reveal`` shows
    them, audited)."""
    from governance.integration.redaction import redact_for_review

    shown = task.as_dict()
    for field in ("args", "kwargs", "context", "action"):
        shown[field] = redact_for_review(shown[field])
    return shown


@app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    reveal: Annotated[
        bool,
        typer.Option(
            "--reveal",
            help="Show secret-named values (an api_token, a password, ...) in full instead of "
            "*** with a fingerprint and length; audited (secret_revealed), with your name.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show one held task as its message says it: the call (what a release runs), who asked,
    why it is held, and the verified approvals so far.

    Everything shown, signed and released comes from the held message; a record whose other
    fields disagree with it was edited in the state Redis, and is refused (exit 1), audited.
    """
    reviewers = context.reviewers()
    found = (
        reviewers.reveal(task_id, context.operator()) if reveal else reviewers.find_call(task_id)
    )
    verified = reviewers.verified_approvals(found, found.task.signed_approvals())
    if as_json:
        output.emit_json(_shown(found, verified, reveal))
        return
    _show_task(found, verified, reveal)


def _shown(found: HeldCall, verified: tuple[str, ...], reveal: bool) -> dict[str, Any]:
    """The JSON of ``held show``: the record's fields, its call from its message."""
    from governance.integration.redaction import redact_for_review

    task = found.task

    def shown(value: Any) -> Any:
        return value if reveal else redact_for_review(value)

    return {
        **task.as_dict(),
        "args": shown(found.envelope.args),
        "kwargs": shown(found.envelope.kwargs),
        "context": shown(task.context),
        "action": shown(task.action),
        "call": shown(found.shown_input),
        "call_hash": found.call,
        "approvals": len(verified),
        "approved_by": list(verified),
    }


def _approvals_text(verified: tuple[str, ...]) -> str:
    names = f" ({', '.join(verified)})" if verified else ""
    return f"{len(verified)} verified{names}"


def _show_task(found: HeldCall, verified: tuple[str, ...], reveal: bool) -> None:
    import json

    from governance.integration.redaction import redact_for_review

    task = found.task
    call = found.shown_input if reveal else redact_for_review(found.shown_input)
    rows: list[tuple[str, Any]] = [
        ("task", task.task_id),
        ("status", task.status.value),
        ("tenant", task.tenant),
        ("agent", task.agent),
        ("run", task.run),
        ("requested by", task.user or "(unknown)"),
        ("task name", task.task_name),
        ("action", f"{task.action_name} ({task.action_class})"),
        ("call", json.dumps(call, sort_keys=True)),
        ("call hash", found.call),
        ("tier", task.tier),
        ("reason", task.reason),
        ("requested", f"{output.when(task.requested_ms)} ({output.relative(task.requested_ms)})"),
        (
            "approvals",
            f"{len(verified)} verified" + (f" ({', '.join(verified)})" if verified else ""),
        ),
    ]
    if task.status.value == "held":
        rows.insert(
            -1, ("expires", f"{output.when(task.expires_ms)} ({output.relative(task.expires_ms)})")
        )
    if task.reheld:
        rows.append(("held again", f"{task.reheld} time(s)"))
    output.show(output.fields_table(rows, title=f"held task {task.task_id}"))
    if task.decisions:
        decisions = output.table(
            "when", "verdict", "reviewer", "reason", "grant", "signed", title="decisions"
        )
        for d in task.decisions:
            grant_s = (d.signed or {}).get("payload", {}).get("grant_s")
            output.add_row(
                decisions,
                output.when(d.at_ms),
                d.verdict,
                d.reviewer or "(expiry)",
                d.reason,
                "" if grant_s is None else output.span(grant_s),
                "yes" if d.signed else "no",
            )
        output.show(decisions)


@app.command("approve")
def approve(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    key: KeyFile = None,
    reason: Annotated[str, typer.Option("--reason", help="Why; signed and recorded.")] = "",
    grant: Annotated[
        str | None,
        typer.Option(
            "--grant",
            help="Also let the agent take this action without approval for DURATION "
            "(e.g. 30m, 8h): a grant, created when the quorum is reached if every approval of "
            "the quorum asks for one (the shortest, at most approval.max_grant).",
            metavar="DURATION",
        ),
    ] = None,
    alert_to: Annotated[
        float | None,
        typer.Option(
            "--alert-to",
            help="For a call held at its run's cost alert: the run's next alert threshold in "
            "USD (signed). Default: the policy's next step (the next multiple of the alert).",
            metavar="USD",
            min=0,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Approve a held task (signed with your key); with the quorum it is released, runs once.

    Until the tenant's quorum of distinct reviewers has approved, the approval is recorded and
    the task stays held. A reviewer may not approve their own request (unless the tenant allows
    it), nor approve twice. The worker runs the task only with the reviewers' valid signatures.

    A call held at its run's cost alert (kind cost_alert) is the run's decision: the run's other
    calls held at the alert are approved with it, and the run goes on up to its next threshold.
    Rejecting one rejects them all and ends the run's later calls.
    """
    grant_for = positive_duration(grant, "--grant", "a grant") if grant is not None else None
    private = _key(key)
    outcome = context.reviewers().approve(
        task_id, private, reason, grant_for=grant_for, alert_to_usd=alert_to
    )
    who = outcome.reviewer
    if as_json:
        output.emit_json(
            {
                "task_id": task_id,
                "outcome": outcome.outcome,
                "reviewer": who,
                "approvals": outcome.approvals,
                "quorum": outcome.quorum,
                "grant": (
                    {"id": outcome.grant_id, "until_ms": outcome.grant_until_ms}
                    if outcome.grant_id
                    else None
                ),
                "task": _listed(outcome.task),
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
    if outcome.grant_id is not None:
        until = output.when(outcome.grant_until_ms)
        output.show(
            f"grant {outcome.grant_id}: agent {outcome.task.agent} may take "
            f"{outcome.task.action_name} without approval until {until}"
        )
    elif grant_for is not None and outcome.outcome == "released":
        output.show("no grant: not every approval of the quorum asked for one")


@app.command("reject")
def reject(
    task_id: Annotated[str, typer.Argument(help="The held task's id.", metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required); signed, recorded.")],
    key: KeyFile = None,
    as_json: JsonFlag = False,
) -> None:
    """Reject a held task (signed with your key): it never runs, its result becomes FAILURE."""
    if not reason.strip():
        raise typer.BadParameter("a rejection needs a reason", param_hint="--reason")
    private = _key(key)
    task = context.reviewers().reject(task_id, private, reason)
    who = task.decisions[-1].reviewer if task.decisions else "?"
    if as_json:
        output.emit_json({"task_id": task_id, "outcome": "rejected", "task": _listed(task)})
        return
    output.show(f"rejected task {task_id} ({who}): {reason}")


@app.command("expire")
def expire(as_json: JsonFlag = False) -> None:
    """Reject, as expired, every held task whose hold has run out (workers sweep too)."""
    expired = context.reviewers().expire_due()
    if as_json:
        output.emit_json({"expired": [_listed(t) for t in expired]})
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
