"""The audit fields every entry about one task shares: who, which run, which task and action,
under which policy (the store's scripts add the rest). The publisher and the worker build the
same template, so every entry about a task, wherever it was written, names it alike."""

from __future__ import annotations

from governance.policy.actions import Action
from governance.policy.context import ActionContext


def audit_template(
    ctx: ActionContext, task_id: str, action: Action, policy_version: str, tier: str | None = None
) -> dict[str, str]:
    """The fields every audit entry about one task carries."""
    template = {
        "tenant": ctx.tenant,
        "agent": ctx.agent,
        "run": ctx.run,
        "task_id": task_id,
        "action": action.name,
        "policy_version": policy_version,
    }
    if tier is not None:
        template["tier"] = tier
    return template
