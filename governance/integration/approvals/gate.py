"""The gate the publisher and the worker ask: is this approval-tier call released?

An approval-tier call runs only when a genuine grant covers it (stored with the reviewers'
signed approvals behind it, verified here) or when its message carries the signed approvals of
a quorum of the tenant's reviewers over this exact call (its call hash). Anything else (a task
marked released in Redis, a copied or edited message) does not pass: a release that does not
verify is audited as forged (or as expired, when genuine but too old) and the call is held
again by its caller.

Callers: the publisher (:meth:`ApprovalGate.lift_with_grant`, so a covered call is not held at
all) and the worker (:meth:`ApprovalGate.release`, :meth:`ApprovalGate.cost_alert_release`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from governance.integration.headers import GovernanceHeaders
from governance.integration.runtime import GovernanceRuntime
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.signing import GrantCheck, Release, check_grant, check_release
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Outcome
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.held import HeldStore

log = logging.getLogger("governance.approvals")

#: The kind of a hold at a run's cost alert (an approval-tier hold is "hold").
COST_ALERT = "cost_alert"

#: Grants this process already audited as forged (each is audited once, not on every call it
#: fails to lift); bounded.
_FORGED_AUDITED: set[tuple[str, str]] = set()


def kind_of(signed: Mapping[str, Any]) -> str:
    """The kind of hold a signed decision is about (``hold`` or ``cost_alert``)."""
    payload = signed.get("payload")
    return str(payload.get("kind", "hold")) if isinstance(payload, Mapping) else ""


def grant_verdict(
    grant: Mapping[str, Any],
    tenant: TenantPolicy,
    agent: str,
    action_names: Iterable[str],
    now_ms: int,
    requested_by: str | None = None,
) -> GrantCheck:
    """Whether a stored grant verifies under ``tenant``'s reviewers and approval rules, was
    signed for this tenant, and covers ``agent`` taking one of ``action_names`` now, for a call
    requested by ``requested_by``."""
    return check_grant(
        grant,
        reviewers=tenant.reviewers,
        quorum=tenant.approval.quorum,
        allow_self_approval=tenant.approval.allow_self_approval,
        max_grant=tenant.approval.max_grant,
        tenant=tenant.name,
        agent=agent,
        action_names=action_names,
        now_ms=now_ms,
        requested_by=requested_by,
    )


class ApprovalGate:
    """Whether an approval-tier call of one app may run now."""

    def __init__(self, runtime: GovernanceRuntime) -> None:
        self.runtime = runtime
        self.store = HeldStore(runtime.state, runtime.sealer)

    def lift_with_grant(self, ctx: ActionContext, action: Action, decision: Decision) -> Decision:
        """An approval-tier decision, lifted when a genuine grant covers the agent's action."""
        tenant = self.runtime.policy.tenant(ctx.tenant)
        if tenant is None:
            return decision
        now_ms = int(time.time() * 1000)
        names = {action.name, decision.action_class or action.name}
        for grant_id, grant in self.store.grants(ctx.tenant).items():
            verdict = grant_verdict(grant, tenant, ctx.agent, names, now_ms, ctx.user)
            if not verdict.ok and verdict.forged:
                self._forged_grant(ctx, grant_id, action, verdict.reason)
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

    def _forged_grant(self, ctx: ActionContext, grant_id: str, action: Action, reason: str) -> None:
        """A stored grant that does not verify (copied from another tenant, its signatures
        not a quorum's, ...): it lifts nothing, and is audited where it was first tried."""
        if (ctx.tenant, grant_id) in _FORGED_AUDITED:
            return
        if len(_FORGED_AUDITED) > 1000:
            _FORGED_AUDITED.clear()
        _FORGED_AUDITED.add((ctx.tenant, grant_id))
        self.runtime.audit(
            AuditEvent(
                type=AuditEventType.FORGED_RELEASE,
                tenant=ctx.tenant,
                agent=ctx.agent,
                run=ctx.run,
                action=action.name,
                decision="hold",
                reason=f"grant {grant_id} does not verify: {reason}",
            )
        )
        log.warning("tenant %s: grant %s does not verify: %s", ctx.tenant, grant_id, reason)

    def release(
        self,
        headers: GovernanceHeaders,
        task_id: str,
        call: str,
        action: Action,
        decision: Decision,
    ) -> Decision | None:
        """The decision under which a held-tier call (whose call hash is ``call``) runs now: a
        genuine grant covers it, or the message carries the signed approvals that release this
        exact call. None: it must be held (a release that does not verify is audited first)."""
        lifted = self.lift_with_grant(headers.context, action, decision)
        if lifted.outcome is not Outcome.hold:
            return lifted
        if not headers.approvals:
            return None
        ctx = headers.context
        release = self._check(ctx, headers.approvals, task_id, call, kind="hold")
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

    def cost_alert_release(
        self, headers: GovernanceHeaders, task_id: str, call: str, action: Action
    ) -> int | None:
        """Whether the message carries the reviewers' approval to go past its run's cost alert:
        the new threshold they set (micro-USD; the lowest any of them signed, 0 when none set
        one: the policy's next step), or None. Approvals that do not verify are audited as a
        forged release (the admission then holds the call again)."""
        approvals = [a for a in headers.approvals if kind_of(a) == COST_ALERT]
        if not approvals:
            return None
        release = self._check(headers.context, approvals, task_id, call, kind=COST_ALERT)
        if release.ok:
            chosen = [p.alert_to_micro for p in release.payloads if p.alert_to_micro is not None]
            return min(chosen) if chosen else 0
        self._refused(headers.context, task_id, action, release, "a cost-alert release")
        return None

    def _check(
        self,
        ctx: ActionContext,
        approvals: Sequence[Mapping[str, Any]],
        task_id: str,
        call: str,
        kind: str,
    ) -> Release:
        """Whether ``approvals`` release this exact call under the tenant's approval rules."""
        tenant = self.runtime.policy.tenant(ctx.tenant)
        if tenant is None:  # authorization denies unknown tenants before any gate
            return Release(False, f"tenant {ctx.tenant!r} is not in the policy")
        return check_release(
            approvals,
            reviewers=tenant.reviewers,
            quorum=tenant.approval.quorum,
            allow_self_approval=tenant.approval.allow_self_approval,
            task_id=task_id,
            call=call,
            requester=ctx.user,
            now_ms=int(time.time() * 1000),
            valid_for=tenant.approval.valid_for,
            collect_for=tenant.approval.expiry,
            kind=kind,
            tenant=tenant.name,
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
