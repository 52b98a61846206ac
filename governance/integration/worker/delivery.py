"""The life of a governed task on the worker (DESIGN: "The life of a task").

1. decode and validate the context from the headers (missing or malformed: deny);
2. authorize (deny, shadow, suggest and hold never run the body);
3. admit in one Lua call: admitted, or waiting in the tenant's wait list (the message is
   acknowledged; a settlement hands it on), or booked for a later rate turn, or rejected; a copy
   of a message that already ran, runs or waits is dropped;
4. run the body, its lease renewed meanwhile;
5. settle in one Lua call, also when the body raised: the outcome (finished, failed, or a retry
   and when) is decided first (:mod:`~governance.integration.worker.outcome`), so the settlement
   (:mod:`~governance.integration.worker.settlement`) records it with its audit entry; it counts
   what the body reported, or the whole reservation when that cannot be known;
6. publish what must travel: hand-offs the calls returned, the retry.

Every decision comes from the policy layer (and the approvals gate) and every state change from
the store; this module only sequences them. When the state store cannot be reached, a task that
has not started goes back to the broker with a short countdown (never parked in the store that
is down): only a policy limit fails a task, never an outage.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import replace
from typing import Any, NoReturn

from celery import states
from celery.exceptions import Retry, SoftTimeLimitExceeded

from governance.integration.approvals.gate import COST_ALERT, ApprovalGate
from governance.integration.approvals.holding import Holding
from governance.integration.audit_fields import audit_template
from governance.integration.errors import (
    ActionDenied,
    ActionFailed,
    LimitExceeded,
    ResultLost,
)
from governance.integration.events import event_fields, flower_fields
from governance.integration.execution import Execution, running
from governance.integration.headers import (
    OUTAGE,
    GovernanceHeaders,
    HeaderError,
    message_call,
    read_headers,
)
from governance.integration.messages import Envelope, envelope_from_request
from governance.integration.pool_view import queue_of_delivery
from governance.integration.redaction import redact
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.integration.waiting_results import store_waiting_state
from governance.integration.worker.outcome import (
    attempt_outcome,
    base_usage,
    counted_usage,
    step_timeout_error,
)
from governance.integration.worker.removed_tenants import removal_grace_ms
from governance.integration.worker.settlement import AttemptSettlement
from governance.policy.actions import Action, LLMCall
from governance.policy.decision import Decision
from governance.policy.errors import ActionError, ErrorKind
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Outcome
from governance.policy.usage import Usage
from governance.store.admission import Admission, AdmissionStatus
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.cooldown import set_cooldown
from governance.store.errors import StoreUnavailable
from governance.store.pending import Pending

log = logging.getLogger("governance.lifecycle")

_rng = random.Random()

#: Backoff of a task sent back while the state store is down: 0.5 s doubling up to this.
OUTAGE_MAX_DELAY_S = 5.0


class Acknowledged(Exception):
    """This delivery ends here without a result of its own (it waits, was held, was a copy):
    ``GovernedTask.__call__`` turns it into Celery's ``Ignore``, raised from a shallow stack,
    because Celery records the whole traceback of an ``Ignore`` on every such delivery.

    ``durable``: the task now lives only in the state Redis (it waits, is parked or held), or
    this was a copy whose message is all the broker has of it: with
    ``GOVERNANCE_STATE_DURABILITY`` set, its message is acknowledged only once its record is
    confirmed durable (``worker.durable_ack``)."""

    def __init__(self, durable: bool = False) -> None:
        super().__init__()
        self.durable = durable


class Delivery:
    """One delivery of one governed task, from its headers to its outcome.

    ``task`` is the bound ``GovernedTask`` (its ``request`` is this delivery's)."""

    def __init__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.runtime: GovernanceRuntime = runtime_for(task.app)
        self.task_id: str = task.request.id
        self.headers: GovernanceHeaders | None = None
        self.action: Action | None = None
        self.decision: Decision | None = None
        self._envelope: Envelope | None = None
        self._call: str | None = None
        #: The queue the message came from: its worker pool's (fair dispatch).
        self.queue = queue_of_delivery(task)
        #: What admission reserved for this attempt (the policy's estimate of the action).
        self._estimate = Usage()
        self._admit_ms = 0.0
        #: Who holds the attempt's lease while this delivery runs it (one id per delivery).
        self.holder = uuid.uuid4().hex
        #: The admission written ahead of the body (see ``start_admission``), and when.
        self._early: tuple[GovernanceHeaders, Action, TenantPolicy, Pending[Admission]] | None
        self._early = None
        self._admit_started = 0.0
        #: When this delivery reached the task (its broker's unacked clock started earlier).
        self._started = time.monotonic()

    # -- the steps -------------------------------------------------------------------------

    def start_admission(self) -> None:
        """Write the admission before the body is called (from ``task_prerun``, see
        :mod:`governance.integration.worker.overlap`) when nothing but the policy decides up to
        there: valid headers without approvals to verify, an action the policy lets run at
        once. Otherwise, or if anything fails, :meth:`run` does every step itself."""
        try:
            headers = read_headers(self.task.request)
            if headers.approvals:
                return
            action = self.task.action_for(self.args, self.kwargs)
            decision = self.runtime.policy.authorize(headers.context, action)
            tenant = self.runtime.policy.tenant(headers.context.tenant)
            if decision.outcome is not Outcome.allow or tenant is None:
                return
            self.task.prepare(action, tenant)
            self.headers, self.action, self.decision = headers, action, decision
            started = time.perf_counter()
            written = self._begin_admit(headers, action, tenant)
        except Exception:
            self.headers, self.action, self.decision = None, None, None
            return
        self._early = (headers, action, tenant, written)
        self._admit_started = started

    def run(self) -> Any:
        if self._early is None:
            headers = self._read_context()
            action = self._build_action()
            if self.runtime.policy.tenant(headers.context.tenant) is None:
                self._tenant_not_in_policy(headers)
            self._authorize(headers, action)
            tenant = self.runtime.policy.tenant(headers.context.tenant)
            assert tenant is not None  # authorization denies unknown tenants
            self._prepare(tenant)
            self._admit_started = time.perf_counter()
            admission = self._admit(headers, action, tenant)
        else:
            headers, action, tenant, written = self._early
            admission = self._admit(headers, action, tenant, written)
        self._admit_ms = round((time.perf_counter() - self._admit_started) * 1000, 3)
        execution = Execution(self.task_id, headers.context, headers.attempt, action)
        started = time.perf_counter()
        error: BaseException | None = None
        result: Any = None
        with self.runtime.leases.hold(admission.ticket), running(execution):
            try:
                result = self.task.run(*self.args, **self.kwargs)
            except BaseException as exc:  # settle first, whatever happened
                error = exc
        run_ms = round((time.perf_counter() - started) * 1000, 3)
        if isinstance(error, SoftTimeLimitExceeded):
            limit = self.runtime.policy.step_timeout(tenant, action)
            # The limit runs from when the pool process took the delivery (its admission
            # included), not from the body's start: say how long the step took by that clock.
            step_ms = max(run_ms, (time.monotonic() - self._started) * 1000)
            error = step_timeout_error(limit, ErrorKind(tenant.step_timeout_error), step_ms)
        counted, spend = counted_usage(
            base_usage(action) + execution.usage, self._estimate, execution.usage_unknown, error
        )
        detail = {"attempt": headers.attempt, "run_ms": run_ms, "admit_ms": self._admit_ms}
        outcome = attempt_outcome(
            error,
            attempt=headers.attempt,
            retry=tenant.retry,
            detail={**detail, **spend},
            rng=_rng,
        )
        if outcome.cooldown is not None:
            self._record_cooldown(headers, action, outcome.cooldown)
        AttemptSettlement(
            self.runtime,
            self.task,
            admission.ticket,
            self.envelope,
            headers.attempt,
            self._started,
            queue=self.queue,
            action=action,
            weight=tenant.weight,
        ).settle(counted, outcome, run_ms)
        if outcome.error is None:
            return result
        if outcome.retry_delay_ms is not None:
            raise Retry(
                f"retry in {outcome.retry_delay_ms} ms",
                exc=outcome.error,
                when=outcome.retry_delay_ms / 1000,
            )
        if isinstance(outcome.error, ActionError):
            raise ActionFailed(outcome.failure) from outcome.error
        # The body's own exception, as Celery reports it (SystemExit or KeyboardInterrupt: the
        # worker is going away); the audit entry has the governance reason.
        raise outcome.error

    def _read_context(self) -> GovernanceHeaders:
        try:
            self.headers = read_headers(self.task.request)
        except HeaderError as exc:
            self._deny(exc.reason)
        return self.headers

    def _build_action(self) -> Action:
        try:
            self.action = self.task.action_for(self.args, self.kwargs)
        except ActionDenied as exc:
            self._deny(exc.reason)
        return self.action

    def _authorize(self, headers: GovernanceHeaders, action: Action) -> Decision:
        self.decision = decision = self.runtime.policy.authorize(headers.context, action)
        if decision.outcome is Outcome.hold:
            self.decision = decision = self._release_or_hold(headers, action, decision)
        if decision.outcome is Outcome.deny:
            self._deny(decision.reason)
        if decision.outcome is Outcome.shadow:
            self._finish_without_running(AuditEventType.SHADOWED, "shadowed", decision)
        if decision.outcome is Outcome.suggest:
            self._finish_without_running(AuditEventType.SUGGESTED, "suggested", decision)
        return decision

    def _tenant_not_in_policy(self, headers: GovernanceHeaders) -> None:
        """A task of a tenant this worker's policy does not name. If the ledger has it, its
        tenant was removed from the policy since it was published: it waits out of the broker
        for the tenant to come back, or ends with the reason once its grace is over (see
        ``store.removed``). Otherwise (a name nobody configured) authorization denies it as
        unknown, and nothing is written under that name."""
        tenant = headers.context.tenant
        removed = self.runtime.removed_tenants
        try:
            with self.runtime.health.call():
                grace_ms = removal_grace_ms(self.runtime, removed.max_wait_ms(tenant))
                verdict = removed.at_delivery(tenant, self.task_id, grace_ms)
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        if verdict.state == "unknown":
            return
        if verdict.state == "ended":
            raise ActionDenied(verdict.reason)
        if verdict.state == "parked":
            reason = "tenant not in the policy: this task waits for it to come back"
            meta = {"reason": reason, "violation": "tenant_removed", "until_ms": verdict.until_ms}
            self._show_waiting(meta)
            self._send_event("deferred", reason, violation="tenant_removed")
        raise Acknowledged(durable=True)  # parked, or a copy of one that ended or runs elsewhere

    def _release_or_hold(
        self, headers: GovernanceHeaders, action: Action, decision: Decision
    ) -> Decision:
        """An approval-tier action runs only when released (or covered by a grant); otherwise
        it goes to the held store and this message is acknowledged."""
        try:
            with self.runtime.health.call():
                released = ApprovalGate(self.runtime).release(
                    headers, self.task_id, self.call(), action, decision
                )
                if released is not None:
                    return released
                Holding(self.task.app, self.runtime).hold(
                    self.envelope(), context=headers.context, action=action, decision=decision
                )
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        raise Acknowledged(durable=True)

    def _prepare(self, tenant: TenantPolicy) -> None:
        assert self.action is not None
        try:
            self.task.prepare(self.action, tenant)
        except ActionDenied as exc:
            self._deny(exc.reason)

    def envelope(self) -> Envelope:
        """This message, as the ledger keeps it (to publish it again)."""
        if self._envelope is None:
            self._envelope = envelope_from_request(self.task, self.args, self.kwargs)
        return self._envelope

    def call(self) -> str:
        """This call's hash (task, arguments, context): what a release must be signed over;
        computed once per delivery, only when an approval is checked."""
        if self._call is None:
            assert self.headers is not None
            self._call = message_call(self.task.name, self.args, self.kwargs, self.headers.context)
        return self._call

    def _template(self) -> dict[str, str]:
        assert self.headers is not None
        assert self.action is not None
        d = self.decision
        return audit_template(
            self.headers.context,
            self.task_id,
            self.action,
            self.runtime.policy.version,
            d.tier.value if d is not None and d.tier is not None else None,
        )

    def _cost_alert_approval(self, headers: GovernanceHeaders, action: Action) -> int | None:
        """The reviewers' verified approval to go past the run's cost alert, if the message
        carries one (see ``ApprovalGate.cost_alert_release``)."""
        if not headers.approvals:
            return None
        with self.runtime.health.call():
            return ApprovalGate(self.runtime).cost_alert_release(
                headers, self.task_id, self.call(), action
            )

    def _hold_at_cost_alert(
        self, headers: GovernanceHeaders, action: Action, admission: Admission
    ) -> NoReturn:
        """The run's cost reached its alert: this call waits in the held store for the
        tenant's reviewers, like an approval-tier action (kind ``cost_alert``)."""
        assert self.decision is not None
        decision = replace(
            self.decision,
            outcome=Outcome.hold,
            reason=admission.reason,
            rule="long_running.cost_alert_usd",
            granted=False,
        )
        try:
            with self.runtime.health.call():
                Holding(self.task.app, self.runtime).hold(
                    self.envelope(),
                    context=headers.context,
                    action=action,
                    decision=decision,
                    kind=COST_ALERT,
                )
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        raise Acknowledged(durable=True)

    def _begin_admit(
        self, headers: GovernanceHeaders, action: Action, tenant: TenantPolicy
    ) -> Pending[Admission]:
        """Write this delivery's admission; the function returned reads the decision."""
        runtime = self.runtime
        self._estimate = runtime.policy.estimate_usage(action)
        alert_approved = self._cost_alert_approval(headers, action)
        with runtime.health.call():
            return runtime.admitter.begin_admit(
                ctx=headers.context,
                action=action,
                task_id=self.task_id,
                attempt=headers.attempt,
                estimate=self._estimate,
                limits=runtime.limits_for(tenant, action),
                holder=self.holder,
                handoff=headers.handoff,
                # A record lost with a failover is made again with its message (durability on).
                envelope=None
                if headers.ledgered and not runtime.durable_on
                else self.envelope().to_json(),
                template=self._template(),
                outage=headers.outage,
                reclaim=runtime.health.may_reclaim,
                cost_alert_approved=alert_approved,
                pool_gated=runtime.pool_view.saturated(self.queue),
                queue=self.queue,
            )

    def _admit(
        self,
        headers: GovernanceHeaders,
        action: Action,
        tenant: TenantPolicy,
        written: Pending[Admission] | None = None,
    ) -> Admission:
        try:
            if written is None:
                written = self._begin_admit(headers, action, tenant)
            with self.runtime.health.call():
                admission = written.result()
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        self.runtime.publish_each(admission.publish)
        self.runtime.pool_view.backlogged(self.queue, admission.queued_ms)
        status = admission.status
        if status is AdmissionStatus.ADMITTED:
            return admission
        if status is AdmissionStatus.COST_ALERT:
            self._hold_at_cost_alert(headers, action, admission)
        if status is AdmissionStatus.SETTLED and admission.final:
            self._store_a_lost_result(admission)
        if admission.replayed and headers.approvals:
            self._release_replayed(headers, action)
        if status.dropped:
            log.info(
                "task %s attempt %s: %s, this copy is dropped",
                self.task_id,
                headers.attempt,
                status.value,
            )
            raise Acknowledged(durable=True)
        if status is AdmissionStatus.REJECTED:
            raise LimitExceeded(admission.reason)
        violation = admission.violation.type.value if admission.violation else "capacity"
        if status is AdmissionStatus.BOOKED and not admission.parked:
            self.runtime.publish(
                self.envelope(), countdown_s=max(0.0, admission.turn_ms / 1000 - time.time())
            )
        meta: dict[str, Any] = {
            "reason": admission.reason,
            "violation": violation,
            "waiting": "turn" if status is AdmissionStatus.BOOKED else "wait list",
        }
        place: dict[str, int] = (
            {"turn_ms": admission.turn_ms}
            if status is AdmissionStatus.BOOKED
            else {"ahead": admission.ahead}
        )
        self._show_waiting({**meta, **place})
        self._send_event("deferred", admission.reason, violation=violation, **place)
        # A turn booked within the countdown limit was published again: that message has it.
        raise Acknowledged(durable=status is not AdmissionStatus.BOOKED or admission.parked)

    def _release_replayed(self, headers: GovernanceHeaders, action: Action) -> None:
        """A release sent again as a later attempt that no settlement scheduled: dropped (the
        release runs once, ever), and audited."""
        ctx = headers.context
        self.runtime.audit(
            AuditEvent(
                type=AuditEventType.RELEASE_REPLAYED,
                tenant=ctx.tenant,
                agent=ctx.agent,
                run=ctx.run,
                task_id=self.task_id,
                action=action.name,
                decision="deny",
                reason=f"a copy of a release as attempt {headers.attempt}, which no settlement "
                "scheduled: dropped (a release runs once)",
            )
        )

    def _store_a_lost_result(self, admission: Admission) -> None:
        """A copy of a task that ended finds no result of it stored (its worker died between
        the settlement and Celery's result write, or the reply of its rejection was lost and
        the call replayed): it ends the task's result the way the task ended, or says the
        result was lost; it never runs the body again. A result already stored is left alone."""
        try:
            stored = self.task.backend.get_task_meta(self.task_id).get("status")
        except Exception:
            log.warning("could not read the result of %s", self.task_id, exc_info=True)
            return
        if stored in states.READY_STATES:
            return
        if admission.reason:
            raise LimitExceeded(admission.reason)
        raise ResultLost(
            f"task {self.task_id} ran and settled (its usage is counted), but its worker died "
            "before its result was stored; it is not run again"
        )

    def _record_cooldown(
        self, headers: GovernanceHeaders, action: Action, error: ActionError
    ) -> None:
        if not isinstance(action, LLMCall) or not error.retry_after_ms:
            return
        spec = self.runtime.policy.config.providers.get(action.provider)
        try:
            set_cooldown(
                self.runtime.state,
                headers.context.tenant,
                action.provider,
                error.retry_after_ms,
                shared=spec is not None and spec.scope == "deployment",
            )
        except StoreUnavailable as exc:
            log.warning("could not record the cooldown of %s: %s", action.provider, exc)

    # -- outcomes that end the task without running its body ---------------------------------

    def _deny(self, reason: str) -> NoReturn:
        ctx = self.headers.context if self.headers else None
        d = self.decision
        self.runtime.end_without_running(
            AuditEvent(
                type=AuditEventType.AUTHORIZATION_DENIED,
                tenant=ctx.tenant if ctx else "",
                agent=ctx.agent if ctx else "",
                run=ctx.run if ctx else "",
                task_id=self.task_id,
                action=self.action.name if self.action else self.task.name,
                decision="deny",
                reason=reason,
                tier=d.tier.value if d and d.tier else "",
            )
        )
        raise ActionDenied(reason)

    def _finish_without_running(
        self, event_type: AuditEventType, outcome: str, decision: Decision
    ) -> NoReturn:
        assert self.action is not None
        assert self.headers is not None
        ctx = self.headers.context
        result = {
            "governance": outcome,
            "action": self.action.name,
            "tier": decision.tier.value if decision.tier else None,
            "reason": decision.reason,
            # Shown to callers, Flower and the audit: secret-named arguments redacted.
            "would_run": redact(self.action.model_dump(mode="json")),
        }
        if event_type is AuditEventType.SUGGESTED:
            # Listed for reviewers as a non-blocking suggestion; the held store's call writes
            # the audit entry with it.
            try:
                Holding(self.task.app, self.runtime).hold(
                    self.envelope(),
                    context=ctx,
                    action=self.action,
                    decision=decision,
                    blocking=False,
                )
            except StoreUnavailable:
                log.warning("suggestion %s could not be listed", self.task_id, exc_info=True)
        else:
            self.runtime.end_without_running(
                AuditEvent(
                    type=event_type,
                    tenant=ctx.tenant,
                    agent=ctx.agent,
                    run=ctx.run,
                    task_id=self.task_id,
                    action=self.action.name,
                    decision=decision.outcome.value,
                    reason=decision.reason,
                    tier=decision.tier.value if decision.tier else "",
                    detail={"would_run": result["would_run"]},
                )
            )
        self.task.backend.mark_as_done(self.task_id, result, request=self.task.request)
        self._send_event(outcome, decision.reason)
        raise Acknowledged()

    def _defer_for_outage(self, exc: StoreUnavailable) -> NoReturn:
        """The state store is down: send this message back to the broker with a short
        countdown (never parked in the store that is down); the admission that finally
        happens records how often and since when."""
        assert self.headers is not None
        count, since = self.headers.outage or (0, int(time.time() * 1000))
        count += 1
        delay = min(
            0.5 * 2 ** min(count - 1, 4),
            OUTAGE_MAX_DELAY_S,
            self.runtime.settings.countdown_limit_s,
        )
        delay *= 1 + _rng.uniform(0, 0.2)
        log.warning(
            "state store unavailable (%s): task %s goes back to the broker for %.1f s",
            exc,
            self.task_id,
            delay,
        )
        self.runtime.publish(
            self.envelope(), headers={OUTAGE: f"{count},{since}"}, countdown_s=delay
        )
        reason = f"state store unavailable; deferred {count} time(s)"
        meta = {"reason": reason, "violation": "store_unavailable", "retry_in_s": round(delay, 2)}
        try:
            self._show_waiting(meta)
        except Exception:
            log.warning("could not record the DEFERRED state of %s", self.task_id, exc_info=True)
        self._send_event("deferred", reason, violation="store_unavailable")
        raise Acknowledged()

    def _show_waiting(self, meta: dict[str, Any]) -> None:
        """The task's result says DEFERRED (with ``meta``), unless it already ended: another
        worker may have been handed it and run it meanwhile (see ``waiting_results``)."""
        store_waiting_state(
            self.task.backend, self.task_id, "DEFERRED", meta, request=self.task.request
        )

    def _send_event(self, kind: str, reason: str, **extra: Any) -> None:
        """``task-<kind>`` for Flower, while a monitor asks for events (what the worker said
        with this task: see ``integration.monitor``)."""
        if not self.runtime.events.wanted(self.task.app):
            return
        ctx = self.headers.context if self.headers else None
        action = self.action.name if self.action else self.task.name
        try:
            fields = flower_fields(kind, event_fields(ctx, action, reason, **extra))
            self.task.send_event(f"task-{kind}", retry=False, **fields)
        except Exception:
            log.warning("could not send task-%s for %s", kind, self.task_id, exc_info=True)
