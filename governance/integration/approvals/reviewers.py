"""The reviewers' workflow: find a held task, approve, reject, expire, grants.

Reviewers decide with ``govctl``, signing each decision with their Ed25519 key (see
:mod:`governance.policy.signing`). The approval that completes the tenant's quorum releases the
task: it is recorded in the ledger and published again with its original id, carrying the signed
approvals, which the worker verifies (:mod:`governance.integration.approvals.gate`). A grant
given with an approval is stored with the approvals that justify it.

Callers: ``govctl`` (every reviewer and operator command) and the worker's maintenance thread
(holds that expire).
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

from governance.integration.approvals.gate import COST_ALERT, grant_verdict
from governance.integration.approvals.held_call import HeldCall, HeldRecordTampered, held_call
from governance.integration.approvals.holding import audit_fields, seal_now, send_held_event
from governance.integration.errors import ApprovalRefused, ApprovalRejected
from governance.integration.events import send_app_event
from governance.integration.headers import APPROVALS, LEDGER
from governance.integration.messages import Envelope
from governance.integration.runtime import GovernanceRuntime
from governance.policy.signing import (
    DecisionPayload,
    check_release,
    grant_until_ms,
    new_nonce,
    reviewer_of,
    sign,
    verified,
)
from governance.policy.tenant import TenantPolicy
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.held import HeldStatus, HeldStore, HeldTask
from governance.store.usage import stop_run_at_cost_alert

log = logging.getLogger("governance.approvals")


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


class Reviewers:
    """The reviewers' decisions on the held tasks of one app."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.store = HeldStore(runtime.state, runtime.sealer)

    def _tenant(self, name: str) -> TenantPolicy:
        tenant = self.runtime.policy.tenant(name)
        if tenant is None:
            raise ApprovalRefused(f"tenant {name!r} is not in the policy")
        return tenant

    # -- reviewer decisions -------------------------------------------------------------------

    def find(self, task_id: str) -> HeldTask:
        task = self.store.find(task_id, self.runtime.policy.tenant_names)
        if task is None:
            raise ApprovalRefused(f"unknown held task {task_id!r}")
        return task

    def find_call(self, task_id: str) -> HeldCall:
        """The held task ``task_id`` as its message says it (what is shown, signed and
        released); a record edited in Redis is refused and audited."""
        return self._call_of(self.find(task_id))

    def _call_of(self, task: HeldTask) -> HeldCall:
        try:
            return held_call(task, self.app)
        except HeldRecordTampered as exc:
            self.runtime.audit(
                AuditEvent(
                    type=AuditEventType.HELD_TAMPERED,
                    tenant=task.tenant,
                    agent=task.agent,
                    run=task.run,
                    task_id=task.task_id,
                    action=task.action_name,
                    decision="deny",
                    reason=str(exc),
                )
            )
            raise

    def reveal(self, task_id: str, by: str) -> HeldCall:
        """The held call, its secret-named values to be shown in full: audited as revealed by
        ``by`` (the operator), before anything is shown."""
        found = self.find_call(task_id)
        task = found.task
        self.runtime.audit(
            AuditEvent(
                type=AuditEventType.SECRET_REVEALED,
                tenant=task.tenant,
                agent=task.agent,
                run=task.run,
                task_id=task.task_id,
                action=task.action_name,
                decision="allow",
                reason=f"the held call's secret-named values were shown to {by}",
                reviewer=by,
            )
        )
        seal_now(self.runtime, task.tenant)
        return found

    def verified_approvals(
        self, found: HeldCall, approvals: Sequence[Mapping[str, Any]]
    ) -> tuple[str, ...]:
        """The reviewers whose signed approvals of this exact call verify against the policy's
        keys (never keys from Redis), one per key: what counts toward the quorum."""
        tenant = self._tenant(found.task.tenant)
        checked = check_release(
            approvals,
            reviewers=tenant.reviewers,
            quorum=tenant.approval.quorum,
            allow_self_approval=tenant.approval.allow_self_approval,
            task_id=found.task.task_id,
            call=found.call,
            requester=found.context.user,
            now_ms=int(time.time() * 1000),
            valid_for=tenant.approval.valid_for,
            collect_for=tenant.approval.expiry,
            kind=found.task.kind,
            tenant=tenant.name,
        )
        return checked.reviewers

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
        found: HeldCall,
        key: Ed25519PrivateKey,
        reviewer: str,
        verdict: str,
        reason: str,
        grant_s: int | None,
        alert_to_micro: int | None = None,
    ) -> dict[str, Any]:
        task = found.task
        payload = DecisionPayload(
            task_id=task.task_id,
            tenant=found.context.tenant,
            agent=found.context.agent,
            action=task.action_name,
            call=found.call,
            verdict="approve" if verdict == "approve" else "reject",
            reviewer=reviewer,
            reason=reason,
            grant_s=grant_s,
            policy=self.runtime.policy.version,
            nonce=new_nonce(),
            at_ms=int(time.time() * 1000),
            kind=task.kind,
            alert_to_micro=alert_to_micro,
            requester=found.context.user or "",
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
            found = self._call_of(task)
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
            signed = self._signed(found, key, reviewer, "approve", reason, grant_s, alert_to)
            stored = task.signed_approvals()
            approvals: list[Mapping[str, Any]] = [*stored, signed]
            quorum = tenant.approval.quorum
            counted = self.verified_approvals(found, approvals)
            if len(counted) < len(approvals):
                self._forged_approvals(found, approvals, counted)
                approvals = [a for a in approvals if _reviewer(a) in counted]
            release = grant = None
            if len(counted) >= quorum:
                message = found.envelope
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
                seen=len(stored) + 1,
                release=release.to_json() if release else None,
                grant=grant,
                audit=audit_fields(task, self.runtime.policy.version, reviewer),
                ttl_s=self.runtime.state.ttl.task_s,
            )
            if decided.outcome == "stale":
                continue
            seal_now(self.runtime, task.tenant)
            self._refuse_unless(decided.outcome, task, reviewer, ("recorded", "released"))
            if decided.outcome == "released" and release is not None:
                self._publish_released(task, release)
            updated = self.store.get(task.tenant, task_id) or task
            released = decided.outcome == "released"
            if not released:  # Flower shows the approvals so far
                send_held_event(self.app, updated, tenant)
            return ApprovalOutcome(
                updated,
                decided.outcome,
                reviewer,
                len(counted),
                quorum,
                grant["id"] if grant and released else None,
                int(grant["until_ms"]) if grant and released else None,
            )
        raise ApprovalRefused(f"task {task_id} kept changing while approving it: try again")

    def _forged_approvals(
        self,
        found: HeldCall,
        approvals: Sequence[Mapping[str, Any]],
        counted: Sequence[str],
    ) -> None:
        """Approvals in the held record that do not verify (written into Redis by someone):
        not counted, and audited."""
        task = found.task
        forged = [a for a in approvals if _reviewer(a) not in counted]
        names = ", ".join(sorted({_reviewer(a) or "?" for a in forged}))
        self.runtime.audit(
            AuditEvent(
                type=AuditEventType.FORGED_RELEASE,
                tenant=task.tenant,
                agent=task.agent,
                run=task.run,
                task_id=task.task_id,
                action=task.action_name,
                decision="hold",
                reason=f"{len(forged)} approval(s) in the held record do not verify ({names}): "
                "not counted",
            )
        )
        log.warning("held task %s: %d approval(s) do not verify", task.task_id, len(forged))

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
        signed = self._signed(self._call_of(task), key, reviewer, "reject", reason, None)
        decided = self.store.decide(
            task,
            verdict="reject",
            reviewer=reviewer,
            reason=reason,
            signed=signed,
            audit=audit_fields(task, self.runtime.policy.version, reviewer),
            ttl_s=self.runtime.state.ttl.task_s,
        )
        seal_now(self.runtime, task.tenant)
        self._refuse_unless(decided.outcome, task, reviewer, ("rejected",))
        self._end(task, f"rejected by {reviewer}: {reason}", reviewer)
        return self.store.get(task.tenant, task_id) or task

    def expire_due(self, now_ms: int | None = None) -> list[HeldTask]:
        """Reject as expired every held task past its expiry; returns those it expired."""
        reason = "expired: no reviewer decision before the hold expired"
        expired = []
        for tenant in self.runtime.policy.tenant_names:
            ids = self.store.due_for_expiry(tenant, now_ms)
            expired += self._end_held(tenant, ids, "expire", reason, now_ms=now_ms)
        return expired

    def end_held(self, tenant: str, task_ids: Iterable[str], reason: str) -> list[HeldTask]:
        """End ``tenant``'s held tasks ``task_ids`` now, with ``reason`` and no reviewer (their
        tenant left the policy); returns those it ended."""
        return self._end_held(tenant, task_ids, "reject", reason)

    def _end_held(
        self,
        tenant: str,
        task_ids: Iterable[str],
        verdict: str,
        reason: str,
        *,
        now_ms: int | None = None,
    ) -> list[HeldTask]:
        ended = []
        for task_id in task_ids:
            task = self.store.get(tenant, task_id)
            if task is None:
                continue
            decided = self.store.decide(
                task,
                verdict=verdict,
                reviewer="",
                reason=reason,
                audit=audit_fields(task, self.runtime.policy.version),
                ttl_s=self.runtime.state.ttl.task_s,
                now_ms=now_ms,
            )
            seal_now(self.runtime, tenant)
            if decided.outcome in ("expired", "rejected"):
                self._end(task, reason, "")
                ended.append(self.store.get(tenant, task_id) or task)
        return ended

    # -- grants -------------------------------------------------------------------------------

    def grants(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's grants, each with whether it is genuine and active now."""
        policy = self._tenant(tenant)
        now_ms = int(time.time() * 1000)
        listed = []
        for grant_id, grant in sorted(self.store.grants(tenant).items()):
            verdict = grant_verdict(
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
        seal_now(self.runtime, tenant)
        if not revoked:
            raise ApprovalRefused(f"unknown grant {grant_id!r} of tenant {tenant!r}")

    # -- helpers ------------------------------------------------------------------------------

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


def _reviewer(signed: Mapping[str, Any]) -> str:
    """The reviewer a signed decision names (unverified: only to tell decisions apart)."""
    payload = signed.get("payload")
    return str(payload.get("reviewer", "")) if isinstance(payload, Mapping) else ""
