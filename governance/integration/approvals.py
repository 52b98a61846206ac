"""Held tasks and their reviewers: hold, approve, reject, expire, grants, and the worker's check.

An approval-tier action is written to the held store instead of running. Reviewers decide with
``govctl``, signing each decision with their Ed25519 key (see :mod:`governance.policy.signing`).
The approval that completes the tenant's quorum releases the task: it is recorded in the ledger
and published again with its original id, carrying the signed approvals. The worker runs it only
if those signatures release this very call (:meth:`Approvals.check`); anything else (a task
marked released in Redis, a copied or edited message) is held again and audited as a forged
release. A grant given with an approval is stored with the approvals that justify it, and the
worker verifies those too.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.integration.errors import ApprovalRefused, ApprovalRejected
from governance.integration.events import (
    call_fields,
    event_fields,
    held_summary,
    iso,
    redact,
    send_app_event,
)
from governance.integration.headers import (
    APPROVALS,
    CONTEXT,
    LEDGER,
    GovernanceHeaders,
    context_json,
)
from governance.integration.messages import Envelope
from governance.integration.runtime import GovernanceRuntime
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.signing import (
    DecisionPayload,
    GrantCheck,
    Release,
    call_hash,
    check_grant,
    check_release,
    grant_until_ms,
    new_nonce,
    reviewer_of,
    sign,
    verified,
)
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Outcome
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.errors import StoreUnavailable
from governance.store.held import HeldStatus, HeldStore, HeldTask
from governance.store.usage import stop_run_at_cost_alert

log = logging.getLogger("governance.approvals")

#: The kind of a hold at a run's cost alert (an approval-tier hold is "hold").
COST_ALERT = "cost_alert"


def _kind_of(signed: Mapping[str, Any]) -> str:
    payload = signed.get("payload")
    return str(payload.get("kind", "hold")) if isinstance(payload, Mapping) else ""


@dataclass(frozen=True)
class ApprovalOutcome:
    """What an approval did: ``released`` once the quorum is reached, else ``recorded``; the
    grant it created (id and end), if the quorum's approvals all asked for one."""

    task: HeldTask
    outcome: str
    reviewer: str
    approvals: int
    quorum: int
    grant_id: str | None = None
    grant_until_ms: int | None = None


def held_message(task: HeldTask) -> Envelope:
    """The held message, to publish it once released (with its chain and options)."""
    return Envelope.from_dict(task.envelope)


def context_dict(context: ActionContext) -> dict[str, Any]:
    """The context as a decision's call hash covers it (exactly as the message carries it)."""
    value: dict[str, Any] = json.loads(context_json(context))
    return value


def message_call(task_name: str, args: Any, kwargs: Any, context: ActionContext) -> str:
    """The call hash of a message (what the reviewers' signatures must be over)."""
    return call_hash(task_name, list(args), dict(kwargs), context_dict(context))


class Approvals:
    """The approval workflow of one Celery app."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.store = HeldStore(runtime.state, runtime.sealer)

    def _tenant(self, name: str) -> TenantPolicy:
        tenant = self.runtime.policy.tenant(name)
        if tenant is None:
            raise ApprovalRefused(f"tenant {name!r} is not in the policy")
        return tenant

    def _audit_fields(self, task: HeldTask, reviewer: str = "") -> dict[str, str]:
        fields = {
            "tenant": task.tenant,
            "agent": task.agent,
            "run": task.run,
            "task_id": task.task_id,
            "action": task.action_name,
            "tier": task.tier,
            "policy_version": self.runtime.policy.version,
        }
        if reviewer:
            fields["reviewer"] = reviewer
        return fields

    # -- holding ------------------------------------------------------------------------------

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
    ) -> HeldTask:
        """Keep the call in the held store (or list it as a suggestion), tell the tenant's
        notifiers and Flower.

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
        if blocking:  # first, so whoever sees the task held also sees the HELD result
            meta = {
                "reason": decision.reason,
                "tenant": context.tenant,
                "agent": context.agent,
                "run": context.run,
                "requested_by": context.user,
                "action": action.name,
                "call": task.action.get("input", task.kwargs),
                "expires_ms": task.expires_ms,
                "govctl": f"govctl held approve {task.task_id} --key PATH",
                "kind": kind,
            }
            self.app.backend.store_result(task.task_id, meta, "HELD")
        notifications = self._notifications(task, tenant)
        self.store.put(
            task,
            audit=self._audit_fields(task),
            detail={"expires_ms": task.expires_ms, "kind": kind},
            notification=notifications,
        )
        self._seal(task.tenant)
        if blocking:
            self._send_held_event(task, tenant, received=now_ms / 1000 if at_publish else None)
        return task

    def _send_held_event(
        self, task: HeldTask, tenant: TenantPolicy | None, received: float | None = None
    ) -> None:
        """``task-held`` for Flower: the call (secrets redacted) in ``args``/``kwargs``, and in
        ``result`` the reason, the context, the requester, the approvals so far, the expiry and
        the commands that decide it (Flower shows only Celery's own task fields)."""
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
        send_app_event(self.app, "held", task.task_id, name=task.task_name, **fields)

    def _notifications(self, task: HeldTask, tenant: TenantPolicy | None) -> dict[str, Any] | None:
        if tenant is None or not tenant.notify:
            return None
        from governance.integration.notify import notification_body

        return {"body": notification_body(task, tenant), "notifiers": len(tenant.notify)}

    # -- on the worker ------------------------------------------------------------------------

    def lift_with_grant(self, ctx: ActionContext, action: Action, decision: Decision) -> Decision:
        """An approval-tier decision, lifted when a genuine grant covers the agent's action."""
        tenant = self.runtime.policy.tenant(ctx.tenant)
        if tenant is None:
            return decision
        now_ms = int(time.time() * 1000)
        names = {action.name, decision.action_class or action.name}
        for grant_id, grant in self.store.grants(ctx.tenant).items():
            verdict = _grant_verdict(grant, tenant, ctx.agent, names, now_ms)
            if verdict.ok:
                reason = f"{decision.reason}; allowed by grant {grant_id} ({verdict.reason})"
                return Decision(
                    Outcome.allow,
                    reason,
                    decision.tier,
                    f"grant {grant_id}",
                    decision.action_class,
                    True,
                    decision.tier_level,
                )
        return decision

    def cost_alert_release(
        self,
        headers: GovernanceHeaders,
        task_name: str,
        task_id: str,
        args: Any,
        kwargs: Any,
        action: Action,
    ) -> int | None:
        """Whether the message carries the reviewers' approval to go past its run's cost alert:
        the new threshold they set (micro-USD; the lowest any of them signed, 0 when none set
        one: the policy's next step), or None. Approvals that do not verify are audited as a
        forged release (the admission then holds the call again)."""
        approvals = [a for a in headers.approvals if _kind_of(a) == COST_ALERT]
        if not approvals:
            return None
        release = self._release(
            headers.context, approvals, task_name, task_id, args, kwargs, kind=COST_ALERT
        )
        if release.ok:
            chosen = [p.alert_to_micro for p in release.payloads if p.alert_to_micro is not None]
            return min(chosen) if chosen else 0
        self._refused(headers.context, task_id, action, release, "a cost-alert release")
        return None

    def _release(
        self,
        ctx: ActionContext,
        approvals: Sequence[Mapping[str, Any]],
        task_name: str,
        task_id: str,
        args: Any,
        kwargs: Any,
        kind: str,
    ) -> Release:
        """Whether ``approvals`` release this exact call under the tenant's approval rules."""
        tenant = self._tenant(ctx.tenant)
        return check_release(
            approvals,
            reviewers=tenant.reviewers,
            quorum=tenant.approval.quorum,
            allow_self_approval=tenant.approval.allow_self_approval,
            task_id=task_id,
            call=message_call(task_name, args, kwargs, ctx),
            requester=ctx.user,
            now_ms=int(time.time() * 1000),
            valid_for=tenant.approval.valid_for,
            collect_for=tenant.approval.expiry,
            kind=kind,
        )

    def _refused(
        self,
        ctx: ActionContext,
        task_id: str,
        action: Action,
        release: Release,
        what: str,
        tier: str = "",
    ) -> None:
        """Audit a release that does not release (the call is held again): one that does not
        verify is forged; genuine approvals whose release is older than ``valid_for`` expired."""
        if release.expired:
            kind, reason = AuditEventType.RELEASE_EXPIRED, f"{what} that expired"
        else:
            kind, reason = AuditEventType.FORGED_RELEASE, f"{what} that does not verify"
        reason = f"{reason}: {release.reason}; held again"
        self.runtime.audit(
            AuditEvent(
                type=kind,
                tenant=ctx.tenant,
                agent=ctx.agent,
                run=ctx.run,
                task_id=task_id,
                action=action.name,
                decision="hold",
                reason=reason,
                tier=tier,
            )
        )
        log.warning("task %s: %s", task_id, reason)

    def check(
        self,
        headers: GovernanceHeaders,
        task_name: str,
        task_id: str,
        args: Any,
        kwargs: Any,
        action: Action,
        decision: Decision,
    ) -> Decision | None:
        """The decision under which a held-tier call runs now: a genuine grant covers it, or the
        message carries the signed approvals that release this exact call. None: it must be
        held (a release that does not verify is audited as forged first)."""
        lifted = self.lift_with_grant(headers.context, action, decision)
        if lifted.outcome is not Outcome.hold:
            return lifted
        if not headers.approvals:
            return None
        ctx = headers.context
        release = self._release(
            ctx, headers.approvals, task_name, task_id, args, kwargs, kind="hold"
        )
        if release.ok:
            return Decision(
                Outcome.allow,
                f"{decision.reason}; {release.reason}",
                decision.tier,
                decision.rule,
                decision.action_class,
                False,
                decision.tier_level,
            )
        tier = decision.tier.value if decision.tier else ""
        self._refused(ctx, task_id, action, release, "a release", tier)
        return None

    # -- reviewer decisions -------------------------------------------------------------------

    def find(self, task_id: str) -> HeldTask:
        task = self.store.find(task_id, self.runtime.policy.tenant_names)
        if task is None:
            raise ApprovalRefused(f"unknown held task {task_id!r}")
        return task

    def reviewer_for(self, task: HeldTask, key: Ed25519PrivateKey) -> str:
        """The reviewer a key belongs to, for this task's tenant; refused if it is not listed."""
        tenant = self._tenant(task.tenant)
        name = reviewer_of(key.public_key(), tenant.reviewers)
        if name is None:
            listed = ", ".join(tenant.reviewers) or "none configured"
            raise ApprovalRefused(
                f"this key is not a reviewer's of tenant {task.tenant!r} (reviewers: {listed}); "
                "a reviewer's public key must be listed in the policy"
            )
        return name

    def _check_open(self, task: HeldTask, verb: str) -> None:
        if not task.blocking:
            raise ApprovalRefused(
                f"task {task.task_id} is a non-blocking suggestion: there is nothing to {verb}"
            )
        if task.status is not HeldStatus.HELD:
            raise ApprovalRefused(f"task {task.task_id} is not held (status: {task.status.value})")

    def _signed(
        self,
        task: HeldTask,
        key: Ed25519PrivateKey,
        reviewer: str,
        verdict: str,
        reason: str,
        grant_s: int | None,
        alert_to_micro: int | None = None,
    ) -> dict[str, Any]:
        payload = DecisionPayload(
            task_id=task.task_id,
            tenant=task.tenant,
            agent=task.agent,
            action=task.action_name,
            call=task.call,
            verdict="approve" if verdict == "approve" else "reject",
            reviewer=reviewer,
            reason=reason,
            grant_s=grant_s,
            policy=self.runtime.policy.version,
            nonce=new_nonce(),
            at_ms=int(time.time() * 1000),
            kind=task.kind,
            alert_to_micro=alert_to_micro,
        )
        return sign(key, payload)

    def approve(
        self,
        task_id: str,
        key: Ed25519PrivateKey,
        reason: str = "",
        grant_for: timedelta | None = None,
        alert_to_usd: float | None = None,
    ) -> ApprovalOutcome:
        """Sign and record an approval; the one that completes the quorum releases the task.

        At a run's cost alert the decision is the run's: the run's other calls held at the
        alert are approved with it, and ``alert_to_usd`` (signed) is the run's next threshold
        (else the policy's next step)."""
        outcome = self._approve_one(task_id, key, reason, grant_for, alert_to_usd)
        self._same_for_the_run(
            outcome.task, lambda other: self._approve_one(other, key, reason, None, alert_to_usd)
        )
        return outcome

    def _same_for_the_run(self, task: HeldTask, decide: Callable[[str], object]) -> None:
        """A decision at a run's cost alert is the run's: ``decide`` the run's other calls held
        at the alert too (one already decided, or that another reviewer is deciding, is left)."""
        if task.kind != COST_ALERT:
            return
        for other in self._run_alert_holds(task):
            try:
                decide(other.task_id)
            except ApprovalRefused as exc:
                log.info("cost alert of run %s: %s", other.run, exc)

    def _run_alert_holds(self, task: HeldTask) -> list[HeldTask]:
        """The other calls of ``task``'s run held at its cost alert."""
        held = []
        cursor = None
        while True:
            page = self.store.page(task.tenant, HeldStatus.HELD, limit=200, cursor=cursor)
            held += [
                t
                for t in page.tasks
                if t.kind == COST_ALERT and t.run == task.run and t.task_id != task.task_id
            ]
            if page.next_cursor is None:
                return held
            cursor = page.next_cursor

    def _approve_one(
        self,
        task_id: str,
        key: Ed25519PrivateKey,
        reason: str,
        grant_for: timedelta | None,
        alert_to_usd: float | None,
    ) -> ApprovalOutcome:
        for _ in range(10):  # another reviewer approving at the same time: read again
            task = self.find(task_id)
            reviewer = self.reviewer_for(task, key)
            self._check_open(task, "approve")
            tenant = self._tenant(task.tenant)
            if task.user == reviewer and not tenant.approval.allow_self_approval:
                raise ApprovalRefused(
                    f"{reviewer!r} requested task {task_id} and may not approve it "
                    f"(tenant {task.tenant!r} forbids self-approval)"
                )
            if any(d.verdict == "approve" and d.reviewer == reviewer for d in task.decisions):
                raise ApprovalRefused(
                    f"{reviewer!r} already approved task {task_id} ({task.approvals} of "
                    f"{tenant.approval.quorum} approvals); another reviewer must approve it"
                )
            if alert_to_usd is not None and task.kind != COST_ALERT:
                raise ApprovalRefused(
                    f"task {task_id} is not held at a cost alert: --alert-to does not apply"
                )
            grant_s = int(grant_for.total_seconds()) if grant_for else None
            alert_to = None if alert_to_usd is None else round(alert_to_usd * 1_000_000)
            signed = self._signed(task, key, reviewer, "approve", reason, grant_s, alert_to)
            approvals: list[Mapping[str, Any]] = [*task.signed_approvals(), signed]
            quorum = tenant.approval.quorum
            release = grant = None
            if len(approvals) >= quorum:
                message = held_message(task)
                # A call held at its cost alert still carries its tier's release, if it had one.
                carried = json.loads(str(message.headers.get(APPROVALS) or "[]"))
                release = message.with_headers(
                    **{
                        APPROVALS: json.dumps([*carried, *approvals], separators=(",", ":")),
                        LEDGER: 1,
                    }
                )
                grant = self._grant(task, tenant, approvals)
            decided = self.store.decide(
                task,
                verdict="approve",
                reviewer=reviewer,
                reason=reason,
                quorum=quorum,
                signed=signed,
                seen=len(approvals),
                release=release.to_json() if release else None,
                grant=grant,
                audit=self._audit_fields(task, reviewer),
                ttl_s=self.runtime.state.ttl.task_s,
            )
            if decided.outcome == "stale":
                continue
            self._seal(task.tenant)
            self._refuse_unless(decided.outcome, task, reviewer, ("recorded", "released"))
            if decided.outcome == "released" and release is not None:
                self._publish_released(task, release)
            updated = self.store.get(task.tenant, task_id) or task
            released = decided.outcome == "released"
            if not released:  # Flower shows the approvals so far
                self._send_held_event(updated, tenant)
            return ApprovalOutcome(
                updated,
                decided.outcome,
                reviewer,
                decided.approvals,
                quorum,
                grant["id"] if grant and released else None,
                int(grant["until_ms"]) if grant and released else None,
            )
        raise ApprovalRefused(f"task {task_id} kept changing while approving it: try again")

    def _grant(
        self, task: HeldTask, tenant: TenantPolicy, approvals: list[Mapping[str, Any]]
    ) -> dict[str, Any] | None:
        payloads = [p for p, _ in (verified(a, tenant.reviewers) for a in approvals) if p]
        until = grant_until_ms(payloads, tenant.approval.max_grant)
        if until is None:
            return None
        grant_id = uuid.uuid4().hex[:12]
        record = {
            "id": grant_id,
            "tenant": task.tenant,
            "agent": task.agent,
            "action": task.action_name,
            "until_ms": until,
            "requester": task.user,
            "decisions": approvals,
        }
        return {"id": grant_id, "json": json.dumps(record), "until_ms": until}

    def reject(self, task_id: str, key: Ed25519PrivateKey, reason: str) -> HeldTask:
        """Sign and record a rejection: the task never runs; its result becomes FAILURE.

        At a run's cost alert the decision is the run's: its other calls held at the alert are
        rejected with it, and its later calls end rejected at admission."""
        task = self._reject_one(task_id, key, reason)
        if task.kind == COST_ALERT:
            stop_run_at_cost_alert(self.runtime.state, task.tenant, task.run)
        self._same_for_the_run(task, lambda other: self._reject_one(other, key, reason))
        return task

    def _reject_one(self, task_id: str, key: Ed25519PrivateKey, reason: str) -> HeldTask:
        if not reason.strip():
            raise ApprovalRefused("a rejection needs a reason")
        task = self.find(task_id)
        reviewer = self.reviewer_for(task, key)
        self._check_open(task, "reject")
        signed = self._signed(task, key, reviewer, "reject", reason, None)
        decided = self.store.decide(
            task,
            verdict="reject",
            reviewer=reviewer,
            reason=reason,
            signed=signed,
            audit=self._audit_fields(task, reviewer),
            ttl_s=self.runtime.state.ttl.task_s,
        )
        self._seal(task.tenant)
        self._refuse_unless(decided.outcome, task, reviewer, ("rejected",))
        self._end(task, f"rejected by {reviewer}: {reason}", reviewer)
        return self.store.get(task.tenant, task_id) or task

    def expire_due(self, now_ms: int | None = None) -> list[HeldTask]:
        """Reject as expired every held task past its expiry; returns those it expired."""
        expired = []
        for tenant in self.runtime.policy.tenant_names:
            for task_id in self.store.due_for_expiry(tenant, now_ms):
                task = self.store.get(tenant, task_id)
                if task is None:
                    continue
                decided = self.store.decide(
                    task,
                    verdict="expire",
                    reviewer="",
                    reason="expired: no reviewer decision before the hold expired",
                    audit=self._audit_fields(task),
                    ttl_s=self.runtime.state.ttl.task_s,
                    now_ms=now_ms,
                )
                self._seal(tenant)
                if decided.outcome == "expired":
                    self._end(task, "expired: no reviewer decision before the hold expired", "")
                    expired.append(self.store.get(tenant, task_id) or task)
        return expired

    # -- grants -------------------------------------------------------------------------------

    def grants(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's grants, each with whether it is genuine and active now."""
        policy = self._tenant(tenant)
        now_ms = int(time.time() * 1000)
        listed = []
        for grant_id, grant in sorted(self.store.grants(tenant).items()):
            verdict = _grant_verdict(
                grant, policy, str(grant.get("agent", "")), [str(grant.get("action", ""))], now_ms
            )
            listed.append(
                {
                    "id": grant_id,
                    "tenant": tenant,
                    "agent": grant.get("agent"),
                    "action": grant.get("action"),
                    "until_ms": grant.get("until_ms"),
                    "active": verdict.ok,
                    "why": verdict.reason,
                }
            )
        return listed

    def revoke(self, tenant: str, grant_id: str, by: str) -> None:
        self._tenant(tenant)
        audit = {"tenant": tenant, "reviewer": by, "policy_version": self.runtime.policy.version}
        revoked = self.store.revoke_grant(tenant, grant_id, audit)
        self._seal(tenant)
        if not revoked:
            raise ApprovalRefused(f"unknown grant {grant_id!r} of tenant {tenant!r}")

    # -- helpers ------------------------------------------------------------------------------

    def _seal(self, tenant: str) -> None:
        """Seal at once what the decision wrote: a reviewer's ``govctl`` exits right after."""
        try:
            self.runtime.audit_log.flush(tenant)
        except StoreUnavailable:
            log.warning("the audit seals of tenant %s are not written yet", tenant)

    def _refuse_unless(
        self, outcome: str, task: HeldTask, reviewer: str, accepted: tuple[str, ...]
    ) -> None:
        if outcome in accepted:
            return
        if outcome == "already_approved":
            raise ApprovalRefused(f"{reviewer!r} already approved task {task.task_id}")
        current = self.store.get(task.tenant, task.task_id)
        status = current.status.value if current else "unknown"
        raise ApprovalRefused(f"task {task.task_id} is not held (status: {status})")

    def _publish_released(self, task: HeldTask, envelope: Envelope) -> None:
        """Publish the released task (the ledger already has it, so a failure here is not a
        loss: the reconciler publishes it). An unreachable broker is found out at once, not
        after Celery's reconnect loops (a reviewer's ``govctl`` would hang for them)."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2)
        except Exception as exc:
            log.warning(
                "the broker is unreachable (%s): released task %s is published by the "
                "reconciler once it is back",
                exc,
                task.task_id,
            )
            return
        try:
            self.runtime.publish(envelope)
        except Exception:
            log.warning("could not publish released task %s; the reconciler will", task.task_id)

    def _end(self, task: HeldTask, reason: str, reviewer: str) -> None:
        self.app.backend.mark_as_failure(task.task_id, ApprovalRejected(reason))
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


def _grant_verdict(
    grant: Mapping[str, Any],
    tenant: TenantPolicy,
    agent: str,
    action_names: Iterable[str],
    now_ms: int,
) -> GrantCheck:
    """Whether a stored grant verifies under ``tenant``'s reviewers and approval rules, and
    covers ``agent`` taking one of ``action_names`` now."""
    return check_grant(
        grant,
        reviewers=tenant.reviewers,
        quorum=tenant.approval.quorum,
        allow_self_approval=tenant.approval.allow_self_approval,
        max_grant=tenant.approval.max_grant,
        agent=agent,
        action_names=action_names,
        now_ms=now_ms,
    )
