"""``govctl audit``: read the newest audit entries, and verify the tenants' sealed chains.

``verify`` walks every chain (one per tenant of the policy, and one for decisions about unknown
tenants) with the deployment's audit key (``GOVERNANCE_AUDIT_KEY``) and names every entry that
was edited, removed, reordered or inserted, a cut tail and a head trimmed beyond the retention:
exit code 4.
"""

from __future__ import annotations

from typing import Annotated

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

app = typer.Typer(help="The tamper-evident audit log: tail it, verify its chains.")

#: What each entry type means, as ``audit tail`` shows it (the entry's own ``decision`` field is
#: the policy's verdict at the time, e.g. ``allow`` on a task that later failed: ``--json`` has it).
OUTCOMES = {
    "authorization_denied": "denied",
    "held": "held for approval",
    "approved": "approved",
    "released": "released",
    "rejected": "rejected",
    "expired": "expired",
    "forged_release": "forged release refused",
    "release_expired": "release expired, held again",
    "suggested": "suggested, not run",
    "shadowed": "shadowed, not run",
    "waiting": "waiting",
    "admitted": "admitted",
    "budget_warning": "budget warning",
    "limit_warning": "limit warning",
    "run_closed": "run closed",
    "task_finished": "finished",
    "task_failed": "failed",
    "retry_scheduled": "retry scheduled",
    "task_revoked": "revoked, not run",
    "task_lost": "lost, published again",
    "grant_created": "grant created",
    "grant_revoked": "grant revoked",
    "notify_failed": "notification failed",
    "policy_reloaded": "policy reloaded",
    "policy_invalid": "invalid policy file, kept the old one",
}


def _chains(tenant: str | None) -> list[str]:
    from governance.store.keys import DEPLOYMENT_CHAIN

    policy = context.runtime().policy
    if tenant is None:
        return [*policy.tenant_names, DEPLOYMENT_CHAIN]
    if tenant != DEPLOYMENT_CHAIN:
        context.check_tenant(policy, tenant)
    return [tenant]


Tenant = Annotated[
    str | None,
    typer.Option("--tenant", "-t", help="Only this tenant's chain (default: every chain)."),
]


@app.command("tail")
def tail(
    count: Annotated[
        int, typer.Option("-n", "--lines", min=1, max=100_000, help="How many entries.")
    ] = 20,
    tenant: Tenant = None,
    as_json: JsonFlag = False,
) -> None:
    """The newest audit entries, oldest first: when, what happened (denied, held, failed, ...),
    tenant/agent, run, action; the task; the reason. ``--json`` has every field."""
    entries = context.runtime().audit_log.tail(_chains(tenant), count)
    if as_json:
        output.emit_json([{"id": e.id, "chain": e.chain, **e.fields} for e in entries])
        return
    output.emit_lines(_entry_lines(e.id, e.fields) for e in entries)


def _entry_lines(entry_id: str, f: dict[str, str]) -> list[str]:
    """One entry as a few lines a person reads: when, what happened, to whom; the task; why.

    Each line is wrapped at spaces only (never inside a word: ids, URLs and paths stay whole),
    continuation lines indented.
    """
    ts = int(f["ts"]) if f.get("ts", "").isdigit() else None
    outcome = OUTCOMES.get(f.get("type", ""), f.get("type", "?"))
    if f.get("reviewer"):
        outcome += f" by {f['reviewer']}"
    who = "/".join(x for x in (f.get("tenant", ""), f.get("agent", "")) if x)
    head = [output.when(ts), outcome, who]
    if f.get("run"):
        head.append(f"run {f['run']}")
    if f.get("action"):
        head.append(f.get("action", ""))
    where = [f"task {f['task_id']}"] if f.get("task_id") else []
    where.append(f"entry {entry_id}")
    if f.get("tier"):
        where.append(f"tier {f['tier']}")
    lines = ["  ".join(x for x in head if x), "  " + "  ".join(where)]
    if f.get("reason"):
        lines.append("  " + f["reason"])
    return lines


@app.command("verify")
def verify(tenant: Tenant = None, as_json: JsonFlag = False) -> None:
    """Check every entry's seal and the chain's order; exit 4 naming what was tampered with."""
    from governance.store.audit_verify import verify_all

    runtime = context.runtime()
    key = runtime.settings.audit_key.get_secret_value().encode()
    grace_ms = round(runtime.settings.seal_grace_s * 1000)
    reports = verify_all(runtime.audit_log, key, _chains(tenant), seal_grace_ms=grace_ms)
    broken = [r for r in reports if not r.ok]
    if as_json:
        output.emit_json(
            {
                "ok": not broken,
                "chains": [
                    {
                        "chain": r.chain,
                        "ok": r.ok,
                        "checked": r.checked,
                        "pending": r.pending,
                        "adopted": r.adopted,
                        "breaks": [{"entry": b.entry, "reason": b.reason} for b in r.breaks],
                    }
                    for r in reports
                ],
            }
        )
    elif not broken:
        checked = sum(r.checked for r in reports)
        pending = sum(r.pending for r in reports)
        note = f", {pending} just written and not sealed yet" if pending else ""
        output.show(f"audit chains ok: {checked} entries verified in {len(reports)} chains{note}")
    if broken:
        lines = [f"chain {r.chain}: {b.reason}" for r in broken for b in r.breaks]
        raise CliError("audit verification failed:\n" + "\n".join(lines), ExitCode.AUDIT_BROKEN)
