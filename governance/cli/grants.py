"""``govctl grants``: the grants reviewers gave with their approvals; revoke one.

A grant lets an agent take an action without approval until it ends. It exists only when the
approval that completed a quorum was one of a quorum that all asked for it, lasts at most the
tenant's ``approval.max_grant``, and is checked by the worker against the reviewers' signatures
(``active`` says whether it verifies and is still running).
"""

from __future__ import annotations

from typing import Annotated

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag, TenantFilter

app = typer.Typer(help="Grants given with approvals: list them, revoke one.", no_args_is_help=True)


@app.command("list")
def list_(
    tenant: TenantFilter = None,
    as_json: JsonFlag = False,
) -> None:
    """Every stored grant: agent, action, until when, and whether it verifies now."""
    reviewers = context.reviewers()
    policy = context.runtime().policy
    context.check_tenant(policy, tenant)
    grants = [g for t in ([tenant] if tenant else policy.tenant_names) for g in reviewers.grants(t)]
    if as_json:
        output.emit_json(grants)
        return
    shown = output.table("grant", "tenant", "agent", "action", "until", "active", title="grants")
    for g in grants:
        output.add_row(
            shown,
            g["id"],
            g["tenant"],
            g["agent"],
            g["action"],
            output.when(g["until_ms"]),
            "yes" if g["active"] else f"no: {g['why']}",
        )
    output.show(shown)


@app.command("revoke")
def revoke(
    grant_id: Annotated[str, typer.Argument(help="The grant's id.", metavar="ID")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The grant's tenant.")],
    as_json: JsonFlag = False,
) -> None:
    """Remove a grant at once (audited): the agent needs approval again."""
    by = context.operator()
    context.check_tenant(context.runtime().policy, tenant)
    context.reviewers().revoke(tenant, grant_id, by)
    if as_json:
        output.emit_json({"grant": grant_id, "tenant": tenant, "revoked": True})
        return
    output.show(f"revoked grant {grant_id} of tenant {tenant}")
