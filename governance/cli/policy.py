"""``govctl policy``: validate and summarize a policy file, and explain a decision.

Both read only the file (no Redis, no Celery): ``check`` exits 5 with every problem as
``file: field.path: reason``, and warns (exit 0) about what is valid but cannot work as meant;
``explain`` prints the outcome, the tier and the config rule that
decided, as the workers would for that tenant, agent and action.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag

if TYPE_CHECKING:
    from governance.policy.actions import Action
    from governance.policy.engine import Policy
    from governance.policy.tenant import TenantPolicy

app = typer.Typer(
    help="The policy file: check it, explain its decisions, see what the workers enforce.",
    no_args_is_help=True,
)

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="The policy file (default: GOVERNANCE_CONFIG_PATH).",
        dir_okay=False,
    ),
]


@app.command("check")
def check(
    file: Annotated[
        Path | None,
        typer.Argument(help="The policy file (default: GOVERNANCE_CONFIG_PATH).", dir_okay=False),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate a policy file and summarize it: tenants, tools, providers (exit 5 if invalid).

    Also warns, on stderr (``--json``: under ``warnings``), about what is valid but will not
    work as meant: a quorum some requester can never meet, reviewers missing, grants expired or
    ending within 30 days. Warnings alone exit 0.
    """
    from governance.policy.warnings import policy_warnings

    policy = context.load_policy(file)
    summary = _summary(policy)
    warnings = policy_warnings(policy)
    summary["warnings"] = [w.as_dict() for w in warnings]
    if as_json:
        output.emit_json(summary)
        return
    for warning in warnings:
        output.warn(warning.message)
    output.show(
        f"{policy.source}: valid (version {policy.version}): {len(summary['tenants'])} tenants, "
        f"{len(summary['tools'])} tools, {len(summary['providers'])} providers"
        + (f"; {len(warnings)} warning(s), on stderr" if warnings else "")
    )
    tenants = output.table(
        "tenant", "tools", "providers", "reviewers", "approval", "concurrency", "budgets",
        title="tenants",
    )  # fmt: skip
    for name, t in summary["tenants"].items():
        output.add_row(
            tenants,
            name,
            ", ".join(t["allowed_tools"]) or "(none)",
            ", ".join(t["allowed_providers"]) or "(none)",
            ", ".join(t["reviewers"]) or "(none)",
            f"quorum {t['approval']['quorum']}, expiry {t['approval']['expiry']}",
            "no limit" if t["concurrency"] is None else t["concurrency"],
            "; ".join(_budget_text(b) for b in t["budgets"]) or "(none)",
        )
    tools = output.table("tool", "class", title="tools")
    for name, spec in summary["tools"].items():
        output.add_row(tools, name, spec)
    providers = output.table("provider", "models", title="providers")
    for name, models in summary["providers"].items():
        output.add_row(providers, name, ", ".join(models) or "(default price only)")
    output.show(tenants, tools, providers)


def _summary(policy: Policy) -> dict[str, Any]:
    from governance.policy.duration import format_duration

    tenants: dict[str, Any] = {}
    for name in policy.tenant_names:
        t = policy.tenant(name)
        assert t is not None
        tenants[name] = {
            "allowed_tools": sorted(t.allowed_tools),
            "allowed_providers": sorted(t.allowed_providers),
            "reviewers": list(t.reviewers),
            "approval": {
                "quorum": t.approval.quorum,
                "expiry": format_duration(t.approval.expiry),
                "allow_self_approval": t.approval.allow_self_approval,
            },
            "concurrency": t.concurrency,
            "budgets": [b.model_dump(exclude_none=True) for b in t.budgets],
            "deny_rules": len(t.deny),
            "hooks": [h.spec for h in t.hooks],
            "grants": len(t.grants),
        }
    config = policy.config
    return {
        "file": policy.source,
        "valid": True,
        "version": policy.version,
        "tenants": tenants,
        "tools": {name: spec.class_ for name, spec in config.tools.items()},
        "providers": {name: sorted(spec.models) for name, spec in config.providers.items()},
    }


def _budget_text(budget: dict[str, Any]) -> str:
    limits = " ".join(f"{k}={v}" for k, v in budget.items() if k != "period")
    return f"{budget['period']}: {limits}"


@app.command("explain")
def explain(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant.")],
    agent: Annotated[str, typer.Option("--agent", "-a", help="The agent.")],
    action: Annotated[
        str,
        typer.Option(
            "--action",
            "-x",
            help="A tool name, or an LLM provider as llm:PROVIDER (or just its name).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="For an LLM call (default: the provider's first)."),
    ] = None,
    user: Annotated[
        str,
        typer.Option(
            "--user",
            "-u",
            help="Who asks (an approval-tier action needs a requester; without one it is denied).",
        ),
    ] = "requester",
    config: ConfigFile = None,
    as_json: JsonFlag = False,
) -> None:
    """The decision for an agent of a tenant taking an action, and the rule that made it.

    Reads only the policy file: its grants count, grants given with approvals (in Redis) are
    not looked up.
    """
    from pydantic import ValidationError

    from governance.policy.context import ActionContext

    policy = context.load_policy(config)
    try:
        ctx = ActionContext(tenant=tenant, agent=agent, run="explain", user=user)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc.errors(include_url=False)[0]["msg"])) from None
    subject = _action(policy, action, model)
    decision = policy.authorize(ctx, subject)
    data: dict[str, Any] = {
        "tenant": tenant,
        "agent": agent,
        "action": subject.model_dump(mode="json", exclude={"messages", "max_tokens"}),
        **decision.to_dict(),
    }
    if as_json:
        output.emit_json(data)
        return
    rows = [
        ("outcome", decision.outcome.value),
        ("tier", decision.tier.value if decision.tier else "(none: denied before a tier)"),
        ("rule", decision.rule),
        ("reason", decision.reason),
        ("action class", decision.action_class or "(unknown)"),
        ("granted", "yes" if decision.granted else "no"),
    ]
    output.show(output.fields_table(rows, title=f"{tenant}/{agent}: {subject.name}"))
    _show_context(policy.tenant(tenant))


def _show_context(tenant: TenantPolicy | None) -> None:
    if tenant is not None and tenant.reviewers:
        output.show(f"reviewers: {', '.join(tenant.reviewers)} (quorum {tenant.approval.quorum})")


def _action(policy: Policy, name: str, model: str | None) -> Action:
    from governance.policy.actions import LLMCall, Message, ToolCall

    providers = policy.config.providers
    provider = name.removeprefix("llm:") if name.startswith("llm:") else None
    if provider is None and name in providers and name not in policy.config.tools:
        provider = name
    if provider is None:
        return ToolCall(tool=name, input={})
    if not provider:
        raise typer.BadParameter("llm: needs a provider name, e.g. llm:fake", param_hint="--action")
    spec = providers.get(provider)
    chosen = model or (next(iter(spec.models), None) if spec else None) or "default"
    return LLMCall(
        provider=provider,
        model=chosen,
        messages=[Message(role="user", content="explain")],
        max_tokens=1,
    )


#: A worker that has not reported for this long is listed as gone (it reports every 5 s).
REPORT_STALE_S = 60.0


@app.command("status")
def status(
    show_all: Annotated[
        bool, typer.Option("--all", help="Also workers that stopped reporting (gone).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Which policy version each running worker enforces, against the file's.

    Workers pick up a changed, valid policy file within seconds, without a restart; an invalid
    file changes nothing (they keep the version they have) and its error is shown here. Needs
    only the state Redis, so it works while the file is invalid. Exits 1 when the file is
    invalid, or a running worker enforces another version than the file's.
    """
    import json
    import time

    from governance.cli.errors import CliError
    from governance.policy.loader import ConfigError
    from governance.store.connection import connect
    from governance.store.keys import DeploymentKeys
    from governance.store.state import StateStore

    settings = context.settings()
    try:
        file_version: str | None = context.load_policy().version
        file_error = None
    except ConfigError as exc:
        file_version, file_error = None, str(exc)
    client = connect(settings.state_url, **settings.state_connection())
    state = StateStore(client)
    context.check_deployment(state, settings)
    raw = state.run("policy reports", lambda: client.hgetall(DeploymentKeys.policy_reports))
    now = time.time()
    workers = []
    for node, report in sorted(raw.items()):
        data = json.loads(report)
        age = now - float(data.get("seen_at", 0))
        data["node"] = node.decode() if isinstance(node, bytes) else str(node)
        data["seen_s_ago"] = round(age, 1)
        data["gone"] = age > REPORT_STALE_S
        data["current"] = data.get("version") == file_version and not data.get("error")
        if show_all or not data["gone"]:
            workers.append(data)
    behind = [w for w in workers if not w["gone"] and not w["current"]]
    if as_json:
        output.emit_json(
            {
                "file": str(settings.config_path),
                "version": file_version,
                "error": file_error,
                "workers": workers,
            }
        )
    else:
        where = f"policy file {settings.config_path}"
        output.show(f"{where}: version {file_version}" if file_version else f"{where}: INVALID")
        if not workers:
            output.show("no running worker has reported yet (they report every 5 s)")
        else:
            rows = output.table("worker", "version", "loaded", "last report", "state")
            for w in workers:
                state_text = "gone" if w["gone"] else "current" if w["current"] else "behind"
                if w.get("error"):
                    state_text = "file invalid: keeps its version"
                output.add_row(
                    rows,
                    w["node"],
                    w.get("version", "?"),
                    output.when(round(float(w.get("loaded_at", 0)) * 1000)),
                    f"{w['seen_s_ago']:g} s ago",
                    state_text,
                )
            output.show(rows)
    if file_error is not None:
        raise CliError(f"the policy file is invalid; the workers keep their version:\n{file_error}")
    if behind:
        raise CliError(
            f"{len(behind)} running worker(s) do not enforce version {file_version}: "
            + ", ".join(w["node"] for w in behind)
        )
