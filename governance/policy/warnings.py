"""Warnings about a valid policy that will not do what its author expects, found before it runs.

A policy can be valid and still silently broken: an approval quorum that some requester can
never meet, or a grant that has ended (or is about to) while the policy still reads as if it
allowed the action. ``govctl policy check`` prints these and exits 0 (they are not errors: the
workers run with such a policy); ``--json`` lists them under ``warnings``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from governance.policy.actions import LLMCall, Message, ToolCall
from governance.policy.engine import Policy
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Tier

#: A grant ending within this time is reported as about to expire.
GRANT_SOON = timedelta(days=30)


@dataclass(frozen=True)
class PolicyWarning:
    """One warning: what kind, about which tenant (and field), and a sentence saying why."""

    # "quorum_unreachable", "no_reviewers", "cost_alert_without_reviewers", "grant_expired",
    # "grant_expires_soon"
    kind: str
    tenant: str
    path: str
    message: str
    reviewer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def policy_warnings(
    policy: Policy, now: datetime | None = None, soon: timedelta = GRANT_SOON
) -> list[PolicyWarning]:
    """Every warning about ``policy`` at ``now`` (default: the current UTC time), by tenant."""
    now = now or datetime.now(UTC)
    found: list[PolicyWarning] = []
    for name in policy.tenant_names:
        tenant = policy.tenant(name)
        assert tenant is not None
        found += _approval_warnings(policy, tenant)
        found += _cost_alert_warnings(tenant)
        found += _grant_warnings(tenant, now, soon)
    return found


def _holds_anything(policy: Policy, tenant: TenantPolicy) -> bool:
    """Whether some agent's action of the tenant resolves to ``act_with_approval``: an allowed
    tool or provider, for any agent or for an agent the tier maps name."""
    actions: list[ToolCall | LLMCall] = [ToolCall(tool=t, input={}) for t in tenant.allowed_tools]
    actions += [
        LLMCall(provider=p, model="any", messages=[Message(role="user", content="x")], max_tokens=1)
        for p in tenant.allowed_providers
    ]
    agents = {"", *tenant.tiers.agents, *tenant.tiers.agent_actions}
    return any(
        tenant.tiers.resolve(agent, action.name, policy.action_class(action)).tier
        is Tier.act_with_approval
        for action in actions
        for agent in agents
    )


def _approval_warnings(policy: Policy, tenant: TenantPolicy) -> list[PolicyWarning]:
    approval = tenant.approval
    path = f"tenants.{tenant.name}.approval.quorum"
    reviewers = sorted(tenant.reviewers)
    if not reviewers:
        if not _holds_anything(policy, tenant):
            return []
        return [
            PolicyWarning(
                "no_reviewers",
                tenant.name,
                f"tenants.{tenant.name}.reviewers",
                f"tenant {tenant.name!r} holds actions for approval but has no reviewers: "
                "no held action of it can ever be released (they expire, rejected)",
            )
        ]
    if approval.allow_self_approval or approval.quorum < len(reviewers):
        return []
    # quorum == number of reviewers (more is an error): a reviewer's own request can collect
    # at most the others' approvals, one short of the quorum.
    others = len(reviewers) - 1
    return [
        PolicyWarning(
            "quorum_unreachable",
            tenant.name,
            path,
            f"tenant {tenant.name!r}: an action requested by reviewer {reviewer!r} can never be "
            f"released: quorum {approval.quorum} needs {approval.quorum} distinct reviewers, "
            f"{reviewer!r} may not approve their own request (allow_self_approval is false) and "
            f"only {others} other reviewer(s) exist; add a reviewer, lower the quorum, or allow "
            "self-approval",
            reviewer,
        )
        for reviewer in reviewers
    ]


def _cost_alert_warnings(tenant: TenantPolicy) -> list[PolicyWarning]:
    """A cost alert holds a run's calls for the reviewers: without any, they only expire."""
    alert = tenant.long_running.cost_alert_usd
    if alert is None or tenant.reviewers:
        return []
    return [
        PolicyWarning(
            "cost_alert_without_reviewers",
            tenant.name,
            f"tenants.{tenant.name}.long_running.cost_alert_usd",
            f"tenant {tenant.name!r} has a cost alert of ${alert:g} per run (from "
            f"{tenant.source('long_running')}) but no reviewers: a run that reaches it has its "
            "calls held until they expire; add reviewers, or set cost_alert_usd: null and use a "
            "run budget (budgets: [{period: run, cost_usd: ...}])",
        )
    ]


def _grant_warnings(tenant: TenantPolicy, now: datetime, soon: timedelta) -> list[PolicyWarning]:
    found = []
    for index, grant in enumerate(tenant.grants):
        path = f"tenants.{tenant.name}.grants[{index}]"
        until = grant.until.strftime("%Y-%m-%dT%H:%M:%SZ")
        what = f"grant of {grant.action!r} to agent {grant.agent!r} of tenant {tenant.name!r}"
        if grant.until <= now:
            found.append(
                PolicyWarning(
                    "grant_expired",
                    tenant.name,
                    path,
                    f"{what} expired at {until}: it allows nothing any more; remove it or "
                    "extend it",
                )
            )
        elif grant.until - now <= soon:
            days = (grant.until - now).total_seconds() / 86_400
            found.append(
                PolicyWarning(
                    "grant_expires_soon",
                    tenant.name,
                    path,
                    f"{what} expires at {until}, in {days:.1f} days",
                )
            )
    return found
