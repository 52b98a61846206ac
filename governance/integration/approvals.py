"""Held tasks and their reviewers: hold, release (approve), reject, expire, and grants.

An approval-tier action is written to the held store instead of running. Reviewers decide with
``govctl``. When the policy's quorum of distinct reviewers has approved, the task is published
again with its original id and a one-time release token: an HMAC (with the deployment's release
secret) over the task id, the hash of its exact call and a nonce. The worker checks the HMAC
against the message it received and spends the token in Redis; a copied, forged or reused token
finds the task held again, never run. The released task then goes through admission as usual.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from governance.integration.errors import ApprovalRefused, ApprovalRejected
from governance.integration.events import event_fields, send_app_event
from governance.integration.headers import RELEASE_TOKEN, GovernanceHeaders
from governance.integration.messages import Envelope
from governance.integration.runtime import GovernanceRuntime
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.grants import Grant
from governance.policy.tiers import Outcome
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.held import HeldStatus, HeldStore, HeldTask, call_hash, token_hash

log = logging.getLogger("governance.approvals")


@dataclass(frozen=True)
class ApprovalOutcome:
    """What an approval did: ``released`` once the quorum is reached, else ``recorded``."""

    task: HeldTask
    outcome: str
    approvals: int
    quorum: int
    grant: Grant | None = None


def held_message(task: HeldTask) -> Envelope:
    """The held message, to publish it once released (with its chain and options)."""
    if task.envelope:
        return Envelope.from_dict(task.envelope)
    options = {"task_id": task.task_id, "headers": dict(task.headers)}
    return Envelope(task.task_name, list(task.args), dict(task.kwargs), options)


class Approvals:
    """The approval workflow of one Celery app."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.store = HeldStore(runtime.state)

    # -- holding ------------------------------------------------------------------------------

    def hold(
        self,
        envelope: Envelope,
        *,
        context: ActionContext,
        action: Action,
        decision: Decision,
        blocking: bool = True,
    ) -> HeldTask:
        """Keep the call in the held store (or list it as a suggestion) and tell Flower."""
        ctx = context
        task_id = envelope.task_id
        tenant = self.runtime.policy.tenant(ctx.tenant)
        expiry = tenant.approval.expiry if tenant else timedelta(hours=24)
        now_ms = int(time.time() * 1000)
        clean = {k: v for k, v in envelope.headers.items() if k != RELEASE_TOKEN}
        kept = replace(envelope, options={**envelope.options, "headers": clean})
        task = HeldTask(
            task_id=task_id,
            tenant=ctx.tenant,
            agent=ctx.agent,
            run=ctx.run,
            user=ctx.user or "",
            task_name=envelope.task,
            args=list(envelope.args),
            kwargs=dict(envelope.kwargs),
            headers=clean,
            action=action.model_dump(mode="json"),
            action_name=action.name,
            action_class=decision.action_class or "",
            tier=decision.tier.value if decision.tier else "",
            reason=decision.reason,
            args_hash=call_hash(envelope.task, list(envelope.args), dict(envelope.kwargs)),
            requested_ms=now_ms,
            expires_ms=now_ms + int(expiry.total_seconds() * 1000),
            status=HeldStatus.HELD if blocking else HeldStatus.SUGGESTED,
            envelope=json.loads(kept.to_json()),
        )
        if blocking:  # first, so whoever sees the task held also sees the HELD result
            meta = {
                "reason": decision.reason,
                "tenant": ctx.tenant,
                "action": action.name,
                "expires_ms": task.expires_ms,
                "govctl": f"govctl held approve {task_id} --reviewer NAME",
            }
            self.app.backend.store_result(task_id, meta, "HELD")
        outcome = self.store.put(task)
        if not blocking:
            return task
        self.runtime.ledger.mark_held(ctx.tenant, task_id)
        if outcome != "waiting":
            self._audit(
                task,
                AuditEventType.HELD,
                reason=decision.reason,
                detail={"expires_ms": task.expires_ms, "outcome": outcome},
            )
        send_app_event(
            self.app,
            "held",
            task_id,
            name=envelope.task,
            **event_fields(ctx, action.name, decision.reason),
        )
        return task

    def lift_with_grant(self, ctx: ActionContext, action: Action, decision: Decision) -> Decision:
        """An approval-tier decision, lifted when a grant given with an earlier approval covers
        the agent's action."""
        grants = self.active_grants(ctx.tenant)
        if not grants:
            return decision
        return self.runtime.policy.authorize(ctx, action, grants=grants)

    def check_release(
        self,
        headers: GovernanceHeaders,
        task_name: str,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        action: Action,
        decision: Decision,
    ) -> Decision | None:
        """The decision under which a held-tier call runs now (a grant covers it, or it was
        released for this exact call), or None: it must be held."""
        lifted = self.lift_with_grant(headers.context, action, decision)
        if lifted.outcome is not Outcome.hold:
            return lifted
        if headers.release_token and self.spend_release_token(
            tenant=headers.context.tenant,
            task_id=task_id,
            task_name=task_name,
            args=args,
            kwargs=kwargs,
            token=headers.release_token,
        ):
            return replace(decision, outcome=Outcome.allow)
        return None

    # -- release tokens -----------------------------------------------------------------------

    def _mac(self, task_id: str, args_hash: str, nonce: str) -> str:
        secret = self.runtime.settings.release_secret.get_secret_value().encode()
        message = f"{task_id}:{args_hash}:{nonce}".encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def release_token(self, task_id: str, args_hash: str) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._mac(task_id, args_hash, nonce)}"

    def spend_release_token(
        self,
        *,
        tenant: str,
        task_id: str,
        task_name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        token: str,
    ) -> bool:
        """True once for a genuine token of this exact call; it cannot be spent again."""
        nonce, _, mac = token.partition(".")
        expected = self._mac(task_id, call_hash(task_name, list(args), dict(kwargs)), nonce)
        if not nonce or not hmac.compare_digest(mac, expected):
            return False
        return self.store.consume_release(tenant, task_id, token)

    # -- reviewer decisions -------------------------------------------------------------------

    def find(self, task_id: str) -> HeldTask:
        task = self.store.find(task_id, list(self.runtime.policy.tenant_names))
        if task is None:
            raise ApprovalRefused(f"unknown held task {task_id!r}")
        return task

    def _check_reviewer(self, task: HeldTask, reviewer: str, verb: str) -> None:
        if not task.blocking:
            raise ApprovalRefused(
                f"task {task.task_id} is a non-blocking suggestion: there is nothing to {verb}"
            )
        if task.status is not HeldStatus.HELD:
            raise ApprovalRefused(f"task {task.task_id} is not held (status: {task.status.value})")
        tenant = self.runtime.policy.tenant(task.tenant)
        reviewers = tenant.reviewers if tenant else ()
        if reviewer not in reviewers:
            listed = ", ".join(reviewers) or "none configured"
            raise ApprovalRefused(
                f"{reviewer!r} is not a reviewer of tenant {task.tenant!r} (reviewers: {listed})"
            )

    def approve(
        self, task_id: str, reviewer: str, reason: str = "", grant_for: timedelta | None = None
    ) -> ApprovalOutcome:
        task = self.find(task_id)
        self._check_reviewer(task, reviewer, "approve")
        tenant = self.runtime.policy.tenant(task.tenant)
        assert tenant is not None
        if task.user and reviewer == task.user and not tenant.approval.allow_self_approval:
            raise ApprovalRefused(
                f"{reviewer!r} requested task {task_id} and may not approve it "
                f"(tenant {task.tenant!r} forbids self-approval)"
            )
        token = self.release_token(task_id, task.args_hash)
        decided = self.store.decide(
            task.tenant,
            task_id,
            verdict="approve",
            reviewer=reviewer,
            reason=reason,
            quorum=tenant.approval.quorum,
            release_token_hash=token_hash(token),
        )
        self._refuse_unless(
            decided.outcome,
            task,
            reviewer,
            decided.approvals,
            tenant.approval.quorum,
            ("recorded", "released"),
        )
        grant = self._grant(task, reviewer, grant_for, reason) if grant_for else None
        if decided.outcome == "recorded":
            self._audit(
                task,
                AuditEventType.APPROVED,
                reviewer=reviewer,
                reason=reason,
                detail={"approvals": decided.approvals, "quorum": tenant.approval.quorum},
            )
        else:
            self._audit(
                task,
                AuditEventType.RELEASED,
                reviewer=reviewer,
                reason=reason,
                detail={"approvals": decided.approvals},
            )
            self._publish_released(task, token)
        updated = self.store.get(task.tenant, task_id) or task
        return ApprovalOutcome(
            updated, decided.outcome, decided.approvals, tenant.approval.quorum, grant
        )

    def reject(self, task_id: str, reviewer: str, reason: str) -> HeldTask:
        if not reason.strip():
            raise ApprovalRefused("a rejection needs a reason")
        task = self.find(task_id)
        self._check_reviewer(task, reviewer, "reject")
        decided = self.store.decide(
            task.tenant, task_id, verdict="reject", reviewer=reviewer, reason=reason
        )
        self._refuse_unless(decided.outcome, task, reviewer, decided.approvals, 0, ("rejected",))
        self._end(task, AuditEventType.REJECTED, f"rejected by {reviewer}: {reason}", reviewer)
        return self.store.get(task.tenant, task_id) or task

    def expire_due(self, now_ms: int | None = None) -> list[HeldTask]:
        """Reject as expired every held task past its expiry; returns those it expired."""
        expired = []
        for tenant in self.store.tenants(self.runtime.policy.tenant_names):
            for task_id in self.store.due_for_expiry(tenant, now_ms):
                decided = self.store.decide(
                    tenant,
                    task_id,
                    verdict="expire",
                    reviewer="",
                    reason="approval expired",
                    now_ms=now_ms,
                )
                if decided.outcome != "expired":
                    continue
                task = self.store.get(tenant, task_id)
                if task is not None:
                    self._end(
                        task,
                        AuditEventType.EXPIRED,
                        "expired: no reviewer decision before the hold expired",
                        "",
                    )
                    expired.append(task)
        return expired

    # -- grants -------------------------------------------------------------------------------

    def _grant(self, task: HeldTask, reviewer: str, duration: timedelta, reason: str) -> Grant:
        grant = Grant(
            agent=task.agent,
            action=task.action_name,
            until=datetime.now(UTC) + duration,
            granted_by=reviewer,
            reason=reason or f"granted with the approval of task {task.task_id}",
        )
        self.store.save_grant(task.tenant, uuid.uuid4().hex, grant.model_dump_json())
        return grant

    def active_grants(self, tenant: str) -> list[Grant]:
        now = datetime.now(UTC)
        grants = [Grant.model_validate_json(raw) for raw in self.store.grants(tenant)]
        return [g for g in grants if g.until > now]

    # -- helpers ------------------------------------------------------------------------------

    def _refuse_unless(
        self,
        outcome: str,
        task: HeldTask,
        reviewer: str,
        approvals: int,
        quorum: int,
        accepted: tuple[str, ...],
    ) -> None:
        if outcome in accepted:
            return
        if outcome == "already_approved":
            raise ApprovalRefused(
                f"{reviewer!r} already approved task {task.task_id} ({approvals} of {quorum} "
                "approvals); another reviewer must approve it"
            )
        current = self.store.get(task.tenant, task.task_id)
        status = current.status.value if current else "unknown"
        raise ApprovalRefused(f"task {task.task_id} is not held (status: {status})")

    def _publish_released(self, task: HeldTask, token: str) -> None:
        """Record the released task in the ledger (so it cannot be lost), then publish it."""
        envelope = held_message(task).with_headers(**{RELEASE_TOKEN: token})
        self.runtime.ledger.record_published(task.tenant, task.task_id, envelope.to_json())
        self.runtime.publish(envelope)

    def _end(self, task: HeldTask, event: AuditEventType, reason: str, reviewer: str) -> None:
        self.app.backend.mark_as_failure(task.task_id, ApprovalRejected(reason))
        self._audit(task, event, reviewer=reviewer, reason=reason)
        send_app_event(
            self.app,
            "rejected",
            task.task_id,
            tenant=task.tenant,
            agent=task.agent,
            run=task.run,
            action=task.action_name,
            reason=reason,
            reviewer=reviewer,
        )

    def _audit(
        self,
        task: HeldTask,
        event: AuditEventType,
        *,
        reviewer: str = "",
        reason: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.runtime.audit(
            AuditEvent(
                type=event,
                tenant=task.tenant,
                agent=task.agent,
                run=task.run,
                task_id=task.task_id,
                action=task.action_name,
                decision="hold",
                tier=task.tier,
                reviewer=reviewer,
                reason=reason or task.reason,
                detail=detail or {},
            )
        )
