"""Holding a call for the reviewers: the held store instead of the broker.

An approval-tier action (or a call at its run's cost alert) is written to the held store with
its exact message (the envelope its release will publish), its call hash, and a notification
for the tenant's reviewers, in one atomic call; its result becomes ``HELD`` and Flower hears of
it. A suggestion (the ``suggest`` tier) is filed the same way, non-blocking.

Callers: the publisher (a call held before it reaches the broker), the worker (a call that
arrives without a valid release, or reaches its run's cost alert) and the reviewers' workflow
(Flower's view of a held task after each approval).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

from governance.integration.approvals.gate import COST_ALERT
from governance.integration.approvals.notify import notification_body
from governance.integration.events import (
    call_fields,
    event_fields,
    held_summary,
    iso,
    send_app_event,
)
from governance.integration.headers import (
    APPROVALS,
    CONTEXT,
    context_dict,
    context_json,
    message_call,
)
from governance.integration.messages import Envelope
from governance.integration.redaction import redact
from governance.integration.runtime import GovernanceRuntime
from governance.integration.waiting_results import store_waiting_state
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.tenant import TenantPolicy
from governance.store.errors import StoreUnavailable
from governance.store.held import HeldStatus, HeldStore, HeldTask

log = logging.getLogger("governance.approvals")


def audit_fields(task: HeldTask, policy_version: str, reviewer: str = "") -> dict[str, str]:
    """The fields of the audit entries about a held task."""
    fields = {
        "tenant": task.tenant,
        "agent": task.agent,
        "run": task.run,
        "task_id": task.task_id,
        "action": task.action_name,
        "tier": task.tier,
        "policy_version": policy_version,
    }
    if reviewer:
        fields["reviewer"] = reviewer
    return fields


def seal_now(runtime: GovernanceRuntime, tenant: str) -> None:
    """Seal at once what a held-store call wrote (a reviewer's ``govctl`` exits right after,
    and a publisher may too)."""
    try:
        runtime.audit_log.flush(tenant)
    except StoreUnavailable:
        log.warning("the audit seals of tenant %s are not written yet", tenant)


class Holding:
    """Puts calls of one app in the held store."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.store = HeldStore(runtime.state, runtime.sealer)

    def hold(
        self,
        envelope: Envelope,
        *,
        context: ActionContext,
        action: Action,
        decision: Decision,
        blocking: bool = True,
        kind: str = "hold",
        at_publish: bool = False,
    ) -> HeldTask | None:
        """Keep the call in the held store (or list it as a suggestion), tell the tenant's
        notifiers and Flower; None when the task already ended (a copy of it: dropped, audited
        as ``release_replayed``, its recorded outcome left as it is).

        ``at_publish``: held by the publisher, so Flower never saw the task on the broker; its
        event then gives the task its ``received`` time (else it would sort last).
        """
        tenant = self.runtime.policy.tenant(context.tenant)
        expiry = tenant.approval.expiry if tenant else timedelta(hours=24)
        now_ms = int(time.time() * 1000)
        # The context exactly as parsed here (a default such as trace_id filled in), so every
        # later delivery parses the same context and hashes the same call. A call held at its
        # run's cost alert keeps the approvals that released it from its tier's hold.
        headers = {
            k: v for k, v in envelope.headers.items() if k != APPROVALS or kind == COST_ALERT
        }
        headers[CONTEXT] = context_json(context)
        kept = Envelope(
            envelope.task, envelope.args, envelope.kwargs, {**envelope.options, "headers": headers}
        )
        task = HeldTask(
            task_id=envelope.task_id,
            tenant=context.tenant,
            agent=context.agent,
            run=context.run,
            user=context.user or "",
            task_name=envelope.task,
            args=list(envelope.args),
            kwargs=dict(envelope.kwargs),
            context=context_dict(context),
            action=action.model_dump(mode="json"),
            action_name=action.name,
            action_class=decision.action_class or "",
            tier=decision.tier.value if decision.tier else "",
            reason=decision.reason,
            call=message_call(envelope.task, envelope.args, envelope.kwargs, context),
            requested_ms=now_ms,
            expires_ms=now_ms + int(expiry.total_seconds() * 1000),
            envelope=json.loads(kept.to_json()),
            status=HeldStatus.HELD if blocking else HeldStatus.SUGGESTED,
            kind=kind,
        )
        notification = (
            {"body": notification_body(task, tenant), "notifiers": len(tenant.notify)}
            if tenant is not None and tenant.notify
            else None
        )
        outcome = self.store.put(
            task,
            audit=audit_fields(task, self.runtime.policy.version),
            detail={"expires_ms": task.expires_ms, "kind": kind},
            notification=notification,
        )
        seal_now(self.runtime, task.tenant)
        if outcome == "ended":
            return None
        if blocking:  # also for a copy of a task still held: Celery marked it STARTED
            meta = {
                "reason": decision.reason,
                "tenant": context.tenant,
                "agent": context.agent,
                "run": context.run,
                "requested_by": context.user,
                "action": action.name,
                # Read by anyone who can read results: secret-named values redacted.
                "call": redact(task.action.get("input", task.kwargs)),
                "expires_ms": task.expires_ms,
                "govctl": f"govctl held approve {task.task_id} --key PATH",
                "kind": kind,
            }
            store_waiting_state(self.app.backend, task.task_id, "HELD", meta)
        if blocking:
            send_held_event(self.app, task, tenant, received=now_ms / 1000 if at_publish else None)
        return task


def send_held_event(
    app: Any, task: HeldTask, tenant: TenantPolicy | None, received: float | None = None
) -> None:
    """``task-held`` for Flower (while a monitor asks for events): see
    :func:`held_event_fields`."""
    send_app_event(app, "held", task.task_id, **held_event_fields(task, tenant, received))


def held_event_fields(
    task: HeldTask, tenant: TenantPolicy | None, received: float | None = None
) -> dict[str, Any]:
    """The fields of a held task's ``task-held``: the call (secrets redacted) in
    ``args``/``kwargs``, and in ``result`` the reason, the context, the requester, the
    approvals so far, the expiry and the commands that decide it (Flower shows only Celery's
    own task fields)."""
    fields = event_fields(None, task.action_name, task.reason)
    fields.update(tenant=task.tenant, agent=task.agent, run=task.run)
    fields.update(call_fields(task.args, task.kwargs))
    fields["result"] = held_summary(
        task_id=task.task_id,
        reason=task.reason,
        tenant=task.tenant,
        agent=task.agent,
        run=task.run,
        user=task.user,
        action=task.action_name,
        approvals=task.approvals,
        quorum=tenant.approval.quorum if tenant else None,
        reviewers=sorted(tenant.reviewers) if tenant else [],
        expires_ms=task.expires_ms,
    )
    fields["expires"] = iso(task.expires_ms)
    fields["context"] = redact(task.context)
    if received is not None:
        fields["received"] = received
    fields["name"] = task.task_name
    return fields
