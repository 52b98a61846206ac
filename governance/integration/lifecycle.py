"""The life of a governed task on the worker (DESIGN: "The life of a task").

1. decode and validate the context from the headers (missing or malformed: deny);
2. authorize (deny, shadow, suggest and hold never run the body);
3. admit in one Lua call: admitted, or waiting in the tenant's wait list (the message is
   acknowledged; a settlement hands it on), or booked for a later rate turn, or rejected; a copy
   of a message that already ran, runs or waits is dropped;
4. run the body, its lease renewed meanwhile;
5. settle in one Lua call, also when the body raised: the outcome (finished, failed, or a retry
   and when) is decided first, so the settlement records it with its audit entry; it counts
   what the body reported, or the whole reservation when that cannot be known (a call whose
   outcome is unknown, see ``TaskLife._counted``);
6. publish what must travel: hand-offs the calls returned, the retry.

Every decision comes from the policy layer and every state change from the store; this module
only sequences them. When the state store cannot be reached, a task that has not started goes
back to the broker with a short countdown (never parked in the store that is down): only a
policy limit fails a task, never an outage.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from celery import states
from celery.exceptions import Retry, SoftTimeLimitExceeded

from governance.integration.approvals import COST_ALERT, Approvals
from governance.integration.errors import (
    RETRIES_EXHAUSTED,
    ActionDenied,
    ActionFailed,
    GovernedRetry,
    LimitExceeded,
    ResultLost,
)
from governance.integration.events import event_fields, flower_fields, redact
from governance.integration.execution import Execution, running
from governance.integration.headers import (
    OUTAGE,
    GovernanceHeaders,
    HeaderError,
    read_headers,
)
from governance.integration.messages import Envelope, envelope_from_request
from governance.integration.overlap import defer_settlement, settling_after_result
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.policy.actions import Action, LLMCall, ToolCall
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.errors import ActionError, ErrorKind
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Outcome
from governance.policy.usage import Usage
from governance.store.admission import Admission, AdmissionStatus, NextAttempt, Settlement
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.cooldown import set_cooldown
from governance.store.errors import StoreUnavailable

if TYPE_CHECKING:
    from governance.integration.task import GovernedTask

log = logging.getLogger("governance.lifecycle")

_rng = random.Random()

#: Backoff of a task sent back while the state store is down: 0.5 s doubling up to this.
OUTAGE_MAX_DELAY_S = 5.0


def audit_template(
    ctx: ActionContext, task_id: str, action: Action, policy_version: str, tier: str | None = None
) -> dict[str, str]:
    """The fields every audit entry about one task carries (the store scripts add the rest)."""
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


def base_usage(action: Action) -> Usage:
    """What every attempt counts before the body reports more: one step (and one tool call)."""
    return Usage(steps=1, tool_calls=1 if isinstance(action, ToolCall) else 0)


class Acknowledged(Exception):
    """This delivery ends here without a result of its own (it waits, was held, was a copy):
    ``GovernedTask.__call__`` turns it into Celery's ``Ignore``, raised from a shallow stack,
    because Celery records the whole traceback of an ``Ignore`` on every such delivery."""


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended, decided before it settles: its audit entry, and what follows."""

    entry: dict[str, Any]
    error: BaseException | None = None
    retry_delay_ms: int | None = None
    failure: str = ""


class TaskLife:
    """One delivery of one governed task, from its headers to its outcome."""

    def __init__(self, task: GovernedTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.runtime: GovernanceRuntime = runtime_for(task.app)
        self.task_id: str = task.request.id
        self.headers: GovernanceHeaders | None = None
        self.action: Action | None = None
        self.decision: Decision | None = None
        self._envelope: Envelope | None = None
        #: What admission reserved for this attempt (the policy's estimate of the action).
        self._estimate = Usage()
        self._admit_ms = 0.0
        #: Who holds the attempt's lease while this delivery runs it (one id per delivery).
        self.holder = uuid.uuid4().hex
        #: The admission written ahead of the body (see ``start_admission``), and when.
        self._early: tuple[GovernanceHeaders, Action, TenantPolicy, Callable[[], Admission]] | None
        self._early = None
        self._admit_started = 0.0
        #: When this delivery reached the task (its broker's unacked clock started earlier).
        self._started = time.monotonic()

    # -- the steps -------------------------------------------------------------------------

    def start_admission(self) -> None:
        """Write the admission before the body is called (from ``task_prerun``, see
        :mod:`governance.integration.overlap`) when nothing but the policy decides up to there:
        valid headers without approvals to verify, an action the policy lets run at once.
        Otherwise, or if anything fails, :meth:`run` does every step itself."""
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
            error = self._step_timed_out(tenant, action, run_ms)
        counted, spend = self._counted(base_usage(action) + execution.usage, execution, error)
        outcome = self._outcome(error, headers, action, tenant, run_ms, spend)
        self._settle(admission, counted, outcome, headers)
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

    def _release_or_hold(
        self, headers: GovernanceHeaders, action: Action, decision: Decision
    ) -> Decision:
        """An approval-tier action runs only when released (or covered by a grant); otherwise
        it goes to the held store and this message is acknowledged."""
        approvals = Approvals(self.task.app, self.runtime)
        try:
            with self.runtime.store_call():
                released = approvals.check(
                    headers, self.task.name, self.task_id, self.args, self.kwargs, action, decision
                )
                if released is not None:
                    return released
                approvals.hold(
                    self.envelope(), context=headers.context, action=action, decision=decision
                )
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        raise Acknowledged()

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

    def _step_timed_out(self, tenant: TenantPolicy, action: Action, run_ms: float) -> ActionError:
        """The body ran out of its step timeout (Celery's soft time limit, set from the policy
        by ``GovernedRequest``): a failure of the kind the tenant's ``step_timeout_error`` says,
        whose outcome is unknown (the step may have done part of its work, an LLM provider may
        have billed the call), so its reservation counts as spent."""
        limit = self.runtime.policy.step_timeout(tenant, action)
        limit_text = f"{limit.total_seconds():g} s" if limit else "its time limit"
        return ActionError(
            f"step_timeout: the step ran {run_ms / 1000:.1f} s, over its step timeout of "
            f"{limit_text}",
            ErrorKind(tenant.step_timeout_error),
            outcome_unknown=True,
        )

    def _cost_alert_approval(self, headers: GovernanceHeaders, action: Action) -> int | None:
        """The reviewers' verified approval to go past the run's cost alert, if the message
        carries one (see ``Approvals.cost_alert_release``)."""
        if not headers.approvals:
            return None
        with self.runtime.store_call():
            return Approvals(self.task.app, self.runtime).cost_alert_release(
                headers, self.task.name, self.task_id, self.args, self.kwargs, action
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
            with self.runtime.store_call():
                Approvals(self.task.app, self.runtime).hold(
                    self.envelope(),
                    context=headers.context,
                    action=action,
                    decision=decision,
                    kind=COST_ALERT,
                )
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        raise Acknowledged()

    def _begin_admit(
        self, headers: GovernanceHeaders, action: Action, tenant: TenantPolicy
    ) -> Callable[[], Admission]:
        """Write this delivery's admission; the function returned reads the decision."""
        runtime = self.runtime
        self._estimate = runtime.policy.estimate_usage(action)
        alert_approved = self._cost_alert_approval(headers, action)
        with runtime.store_call():
            return runtime.admitter.begin_admit(
                ctx=headers.context,
                action=action,
                task_id=self.task_id,
                attempt=headers.attempt,
                estimate=self._estimate,
                limits=runtime.limits_for(tenant, action),
                holder=self.holder,
                handoff=headers.handoff,
                envelope=None if headers.ledgered else self.envelope().to_json(),
                template=self._template(),
                outage=headers.outage,
                reclaim=runtime.may_reclaim,
                cost_alert_approved=alert_approved,
            )

    def _admit(
        self,
        headers: GovernanceHeaders,
        action: Action,
        tenant: TenantPolicy,
        written: Callable[[], Admission] | None = None,
    ) -> Admission:
        try:
            if written is None:
                written = self._begin_admit(headers, action, tenant)
            with self.runtime.store_call():
                admission = written()
        except StoreUnavailable as exc:
            self._defer_for_outage(exc)
        self.runtime.publish_each(admission.publish)
        status = admission.status
        if status is AdmissionStatus.ADMITTED:
            return admission
        if status is AdmissionStatus.COST_ALERT:
            self._hold_at_cost_alert(headers, action, admission)
        if status is AdmissionStatus.SETTLED and admission.final:
            self._store_a_lost_result(admission)
        if status.dropped:
            log.info(
                "task %s attempt %s: %s, this copy is dropped",
                self.task_id,
                headers.attempt,
                status.value,
            )
            raise Acknowledged()
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
        if status is AdmissionStatus.BOOKED:
            meta["turn_ms"] = admission.turn_ms
        else:
            meta["ahead"] = admission.ahead
        self.task.update_state(state="DEFERRED", meta=meta)
        self._send_event("deferred", admission.reason, violation=violation)
        raise Acknowledged()

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

    def _counted(
        self, reported: Usage, execution: Execution, error: BaseException | None
    ) -> tuple[Usage, dict[str, Any]]:
        """What the attempt counts at settlement, and what its audit entry says about it.

        What the body reported, normally. When what the call used cannot be known (the body
        said so with ``report_usage_unknown``, or raised an ``ActionError`` with
        ``outcome_unknown``: a timeout after the request was sent, a lost connection), at least
        the attempt's whole reservation: the provider may have billed it, and counting it keeps
        a budget from being exceeded by calls that fail that way, on every attempt
        (``"spend": "assumed"``). Usage reported above the reservation counts as reported, and
        the entry records the excess (the next admission sees it in the window's usage).
        """
        reason = execution.usage_unknown or _unknown_outcome(error)
        if reason is not None:
            return reported.at_least(self._estimate), {"spend": "assumed", "spend_reason": reason}
        excess = reported.excess_over(self._estimate)
        return reported, ({"excess": excess} if excess else {})

    def _outcome(
        self,
        error: BaseException | None,
        headers: GovernanceHeaders,
        action: Action,
        tenant: TenantPolicy,
        run_ms: float,
        spend: dict[str, Any],
    ) -> AttemptOutcome:
        attempts = headers.attempt + 1
        detail: dict[str, Any] = {
            "attempt": headers.attempt,
            "run_ms": run_ms,
            "admit_ms": self._admit_ms,
            **spend,
        }
        if error is None:
            return AttemptOutcome({"type": "task_finished", "decision": "allow", "detail": detail})
        if not isinstance(error, Exception):
            reason = f"interrupted ({type(error).__name__}) during attempt {attempts}"
            return AttemptOutcome(
                {"type": "task_failed", "decision": "allow", "reason": reason, "detail": detail},
                error=error,
                failure=reason,
            )
        if isinstance(error, GovernedRetry | Retry):
            cause = error.exc if isinstance(error.exc, BaseException) else error
            delay_s = error.delay_s if isinstance(error, GovernedRetry) else _when_s(error)
            delay = round(delay_s * 1000)
            if isinstance(cause, ActionError) and cause.kind is ErrorKind.rate_limited:
                delay = max(delay, cause.retry_after_ms or 0)
                self._record_cooldown(headers, action, cause)
            reason = f"retry requested by the task: {cause}"
            return self._retry(reason, delay, error, detail)
        classified = (
            error
            if isinstance(error, ActionError)
            else ActionError.permanent(f"{type(error).__name__}: {error}")
        )
        if classified.kind is ErrorKind.rate_limited:
            self._record_cooldown(headers, action, classified)
        exhausted = getattr(error, RETRIES_EXHAUSTED, False)
        planned = None if exhausted else tenant.retry.delay_ms(classified, headers.attempt, _rng)
        detail["kind"] = classified.kind.value
        if planned is None:
            reason = (
                f"{classified.kind.value} error after {attempts} attempt(s): {classified.message}"
            )
            return AttemptOutcome(
                {"type": "task_failed", "decision": "allow", "reason": reason, "detail": detail},
                error=error,
                failure=reason,
            )
        reason = f"{classified.kind.value} error: {classified.message}"
        return self._retry(reason, planned, error, detail)

    def _retry(
        self, reason: str, delay_ms: int, error: BaseException, detail: dict[str, Any]
    ) -> AttemptOutcome:
        detail = {**detail, "delay_ms": delay_ms}
        return AttemptOutcome(
            {
                "type": "retry_scheduled",
                "decision": "allow",
                "reason": f"{reason}; retry in {delay_ms} ms",
                "detail": detail,
            },
            error=error,
            retry_delay_ms=delay_ms,
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

    def _settle(
        self,
        admission: Admission,
        actual: Usage,
        outcome: AttemptOutcome,
        headers: GovernanceHeaders,
    ) -> None:
        next_attempt = None
        parked = False
        if outcome.retry_delay_ms is not None:
            due_ms = int(time.time() * 1000) + outcome.retry_delay_ms
            parked = outcome.retry_delay_ms / 1000 > self.runtime.settings.countdown_limit_s
            next_envelope = self.envelope().with_retries(headers.attempt + 1)
            next_attempt = NextAttempt(next_envelope.to_json(), due_ms, parked)
        settings = self.runtime.settings
        admitter = self.runtime.admitter

        def write() -> Callable[[], Settlement]:
            """Write the settlement; the function returned reads what it did."""
            with self.runtime.store_call():
                return admitter.begin_settle(
                    admission.ticket,
                    actual,
                    entry=outcome.entry,
                    next_attempt=next_attempt,
                    reclaim=self.runtime.may_reclaim,
                    policy_version=self.runtime.policy.version,
                )

        def settle(written: Callable[[], Settlement] | None = None) -> None:
            read = written or write()
            with self.runtime.store_call():
                settlement = read()
            self.runtime.publish_each(settlement.publish)
            if next_attempt is not None and not parked and outcome.retry_delay_ms is not None:
                self._publish_retry(headers, outcome.retry_delay_ms)

        # Never longer than half the broker's limit on an unacknowledged delivery.
        deadline = min(
            time.monotonic() + settings.settle_patience_s,
            self._started + settings.unacked_limit_s / 2,
        )

        def settle_patiently(written: Callable[[], Settlement] | None = None) -> None:
            pause = 0.2
            while True:
                try:
                    settle(written)
                    return
                except StoreUnavailable as exc:
                    written = None
                    if time.monotonic() + pause > deadline:
                        log.error(
                            "task %s ran but could not be settled: %s; its delivery is "
                            "acknowledged and this worker process settles it when the state "
                            "store is back",
                            self.task_id,
                            exc,
                        )
                        self.runtime.settle_later(admission.ticket, settle)
                        return
                    log.warning("settlement of %s failed, trying again: %s", self.task_id, exc)
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)

        if settling_after_result(self.task):
            # Written now, read once Celery has stored the result (its round trip overlaps
            # this one), in ``task_postrun``: before the delivery is acknowledged.
            try:
                written = write()
            except StoreUnavailable:
                pass
            else:
                defer_settlement(self.task, lambda: settle_patiently(written))
                return
        settle_patiently()

    def _publish_retry(self, headers: GovernanceHeaders, delay_ms: int) -> None:
        envelope = self.envelope().with_retries(headers.attempt + 1)
        try:
            self.runtime.publish(envelope, countdown_s=delay_ms / 1000)
        except Exception:
            log.warning(
                "could not publish the retry of %s; the reconciler will",
                self.task_id,
                exc_info=True,
            )

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
                Approvals(self.task.app, self.runtime).hold(
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
            self.task.update_state(state="DEFERRED", meta=meta)
        except Exception:
            log.warning("could not record the DEFERRED state of %s", self.task_id, exc_info=True)
        self._send_event("deferred", reason, violation="store_unavailable")
        raise Acknowledged()

    def _send_event(self, kind: str, reason: str, **extra: Any) -> None:
        ctx = self.headers.context if self.headers else None
        action = self.action.name if self.action else self.task.name
        try:
            fields = flower_fields(kind, event_fields(ctx, action, reason, **extra))
            self.task.send_event(f"task-{kind}", retry=False, **fields)
        except Exception:
            log.warning("could not send task-%s for %s", kind, self.task_id, exc_info=True)


def _unknown_outcome(error: BaseException | None) -> str | None:
    """Why the attempt's spend is unknown, when the body ended with an ``ActionError`` (raised,
    or given to a retry) whose request was sent and whose outcome is unknown; else None."""
    if isinstance(error, GovernedRetry | Retry):
        error = error.exc if isinstance(error.exc, BaseException) else None
    if isinstance(error, ActionError) and error.outcome_unknown:
        return f"outcome unknown: {error.message}"
    return None


def _when_s(retry: Retry) -> float:
    when = retry.when
    if when is None:
        return 0.0
    if isinstance(when, int | float):
        return float(when)
    return max(0.0, float(when.timestamp()) - time.time())
