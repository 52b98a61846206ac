"""The publisher side: enqueue a governed task with its context, denied at once if it must be.

Authorization also runs here so a caller learns about a denial immediately and nothing is
enqueued; the worker authorizes again all the same (messages can come from anyone who can reach
the broker).
"""

from __future__ import annotations

import uuid
from typing import Any

from governance.integration.approvals import Approvals
from governance.integration.errors import ActionDenied
from governance.integration.execution import current_execution
from governance.integration.headers import GovernanceHeaders
from governance.integration.runtime import runtime_for
from governance.policy.context import ActionContext
from governance.policy.tiers import Outcome
from governance.store.audit import AuditEvent, AuditEventType


def inherit(ctx: ActionContext) -> ActionContext:
    """Inside a governed body, a child of the same run is a discovered step one level deeper."""
    parent = current_execution()
    if parent is None or (parent.context.tenant, parent.context.run) != (ctx.tenant, ctx.run):
        return ctx
    return ctx.model_copy(
        update={
            "discovery_depth": max(ctx.discovery_depth, parent.context.discovery_depth + 1),
            "parent_task_id": parent.task_id,
        }
    )


def submit(task: Any, ctx: ActionContext, *args: Any, **kwargs: Any) -> Any:
    """Authorize and enqueue ``task(*args, **kwargs)`` for ``ctx``; returns its AsyncResult.

    Raises :class:`ActionDenied` (and enqueues nothing) when the policy denies the action or its
    input is invalid. An approval-tier action goes to the held store instead of the broker: the
    result's state is ``HELD`` until reviewers release or reject it.
    """
    runtime = runtime_for(task.app)
    ctx = inherit(ctx)
    try:
        action = task.build_action(args, kwargs)
    except ValueError as exc:
        raise ActionDenied(f"invalid action for {task.name}: {exc}") from None
    decision = runtime.policy.authorize(ctx, action)
    approvals = Approvals(task.app, runtime)
    if decision.outcome is Outcome.hold:
        grants = approvals.active_grants(ctx.tenant)
        if grants:  # a grant given with an earlier approval lifts the hold
            decision = runtime.policy.authorize(ctx, action, grants=grants)
    denial = None
    if decision.outcome is Outcome.deny:
        denial = decision.reason
    else:
        tenant = runtime.policy.tenant(ctx.tenant)
        assert tenant is not None
        try:
            task.prepare(action, tenant)
        except ActionDenied as exc:
            denial = exc.reason
    if denial is not None:
        runtime.audit(
            AuditEvent(
                type=AuditEventType.AUTHORIZATION_DENIED,
                tenant=ctx.tenant,
                agent=ctx.agent,
                run=ctx.run,
                action=action.name,
                decision="deny",
                reason=denial,
                tier=decision.tier.value if decision.tier else "",
                detail={"at": "publish"},
            )
        )
        raise ActionDenied(denial)
    headers = GovernanceHeaders(context=ctx)
    if decision.outcome is Outcome.hold:
        task_id = str(uuid.uuid4())
        approvals.hold(
            task_name=task.name,
            task_id=task_id,
            args=list(args),
            kwargs=dict(kwargs),
            headers=headers,
            action=action,
            decision=decision,
        )
        return task.AsyncResult(task_id)
    return task.apply_async(args, kwargs, headers=headers.to_headers())
