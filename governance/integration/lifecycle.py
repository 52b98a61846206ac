"""The life of a governed task on the worker (DESIGN.md, "The life of a task").

1. decode and validate the context from the headers (missing or malformed: deny);
2. authorize (deny, shadow, suggest and hold never run the body);
3. admit in one Lua call (over a limit: deferred, which does not use up retries);
4. run the body, its lease renewed meanwhile;
5. settle in one Lua call, also when the body raised;
6. on error: classify, then retry with backoff / Retry-After, or fail with the reason.

Every decision comes from the policy layer and every state change from the store; this module
only sequences them and reports each step (audit entry, Celery task event).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Ignore, Retry

from governance.integration.approvals import Approvals
from governance.integration.errors import ActionDenied, ActionFailed, LimitExceeded
from governance.integration.events import event_fields, flower_fields
from governance.integration.execution import Execution, running
from governance.integration.headers import GovernanceHeaders, HeaderError, read_headers
from governance.integration.republish import republish
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.policy.actions import Action, LLMCall, ToolCall
from governance.policy.decision import Decision
from governance.policy.errors import ActionError, ErrorKind
from governance.policy.tenant import TenantPolicy
from governance.policy.tiers import Outcome
from governance.policy.usage import Usage
from governance.store.admission import Admission, AdmissionStatus
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.cooldown import set_cooldown
from governance.store.errors import StoreUnavailable

if TYPE_CHECKING:
    from governance.integration.task import GovernedTask

log = logging.getLogger("governance.lifecycle")

_rng = random.Random()


def base_usage(action: Action) -> Usage:
    """What every attempt counts before the body reports more: one step (and one tool call)."""
    return Usage(steps=1, tool_calls=1 if isinstance(action, ToolCall) else 0)


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

    # -- the steps -------------------------------------------------------------------------

    def run(self) -> Any:
        headers = self._read_context()
        action = self._build_action()
        self._authorize(headers, action)
        tenant = self.runtime.policy.tenant(headers.context.tenant)
        assert tenant is not None  # authorization denies unknown tenants
        self._prepare(tenant)
        admit_started = time.perf_counter()
        admission = self._admit(headers, action, tenant)
        admit_ms = round((time.perf_counter() - admit_started) * 1000, 3)
        try:
            self._audit(
                AuditEventType.ADMITTED,
                AuditEventType.TASK_STARTED,
                required=True,
                detail={"admit_ms": admit_ms, "attempt": headers.attempt},
            )
        except StoreUnavailable as exc:  # nothing runs unrecorded; the lease expires on its own
            self._defer(tenant, tenant.deferral.backoff_base_ms, "store_unavailable", str(exc))
        execution = Execution(self.task_id, headers.context, headers.attempt, action)
        error: BaseException | None = None
        result: Any = None
        with self.runtime.leases.hold(admission.ticket), running(execution):
            try:
                result = self.task.run(*self.args, **self.kwargs)
            except BaseException as exc:  # settle first, whatever happened
                error = exc
        self._settle(admission, base_usage(action) + execution.usage)
        if error is None:
            self._audit(AuditEventType.TASK_FINISHED)
            return result
        return self._handle_error(error, headers, action, tenant)

    def _read_context(self) -> GovernanceHeaders:
        try:
            self.headers = read_headers(self.task.request)
        except HeaderError as exc:
            self._deny(exc.reason)
        return self.headers

    def _build_action(self) -> Action:
        try:
            self.action = self.task.build_action(self.args, self.kwargs)
        except ActionDenied as exc:
            self._deny(exc.reason)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self._deny(f"invalid action for {self.task.name}: {exc}")
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
        """An approval-tier action runs only with a grant or a genuine, unspent release token;
        otherwise it goes to the held store and this message is acknowledged."""
        approvals = Approvals(self.task.app, self.runtime)
        ctx = headers.context
        try:
            grants = approvals.active_grants(ctx.tenant)
            if grants:
                regranted = self.runtime.policy.authorize(ctx, action, grants=grants)
                if regranted.outcome is not Outcome.hold:
                    return regranted
            if headers.release_token and approvals.spend_release_token(
                tenant=ctx.tenant,
                task_id=self.task_id,
                task_name=self.task.name,
                args=list(self.args),
                kwargs=self.kwargs,
                token=headers.release_token,
            ):
                return replace(decision, outcome=Outcome.allow)
            approvals.hold(
                task_name=self.task.name,
                task_id=self.task_id,
                args=list(self.args),
                kwargs=self.kwargs,
                headers=headers,
                action=action,
                decision=decision,
            )
        except StoreUnavailable as exc:
            tenant = self.runtime.policy.tenant(ctx.tenant)
            assert tenant is not None
            self._defer(tenant, tenant.deferral.backoff_base_ms, "store_unavailable", str(exc))
        raise Ignore()

    def _prepare(self, tenant: TenantPolicy) -> None:
        assert self.action is not None
        try:
            self.task.prepare(self.action, tenant)
        except ActionDenied as exc:
            self._deny(exc.reason)

    def _admit(self, headers: GovernanceHeaders, action: Action, tenant: TenantPolicy) -> Admission:
        try:
            admission = self.runtime.admitter.admit(
                ctx=headers.context,
                action=action,
                task_id=self.task_id,
                attempt=headers.attempt,
                estimate=self.runtime.policy.estimate_usage(action),
                limits=self.runtime.limits_for(tenant, action),
                holder=uuid.uuid4().hex,
            )
        except StoreUnavailable as exc:
            self._defer(tenant, tenant.deferral.backoff_base_ms, "store_unavailable", str(exc))
        if admission.status is AdmissionStatus.SETTLED:
            log.info(
                "task %s attempt %s already ran and settled: not running it again",
                self.task_id,
                headers.attempt,
            )
            raise Ignore()
        if admission.status is AdmissionStatus.REJECTED:
            assert admission.violation is not None
            self._audit(
                AuditEventType.TASK_FAILED,
                reason=admission.violation.message,
                detail={"violation": admission.violation.type.value},
            )
            raise LimitExceeded(admission.violation.message)
        if not admission.admitted:
            assert admission.violation is not None
            self._defer(
                tenant,
                admission.wait_ms,
                admission.violation.type.value,
                admission.violation.message,
            )
        return admission

    def _settle(self, admission: Admission, actual: Usage) -> None:
        for attempt in range(3):
            try:
                settlement = self.runtime.admitter.settle(admission.ticket, actual)
                break
            except StoreUnavailable as exc:
                log.warning("settlement of %s failed (try %d): %s", self.task_id, attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
        else:
            log.error(
                "task %s ran but its usage could not be settled; its lease and reservation "
                "expire after one lease period",
                self.task_id,
            )
            return
        for warning in settlement.warnings:
            self._audit(
                AuditEventType.BUDGET_WARNING,
                reason=warning.message,
                detail={"violation": warning.type.value, "percent": warning.percent},
            )

    def _handle_error(
        self, error: BaseException, headers: GovernanceHeaders, action: Action, tenant: TenantPolicy
    ) -> NoReturn:
        if not isinstance(error, Exception):
            raise error  # SystemExit, KeyboardInterrupt: the worker is going away
        classified = (
            error
            if isinstance(error, ActionError)
            else ActionError.permanent(f"{type(error).__name__}: {error}")
        )
        if (
            classified.kind is ErrorKind.rate_limited
            and classified.retry_after_ms
            and isinstance(action, LLMCall)
        ):
            self._record_cooldown(headers, action, classified.retry_after_ms)
        delay = tenant.retry.delay_ms(classified, headers.attempt, _rng)
        attempts = headers.attempt + 1
        if delay is None:
            reason = (
                f"{classified.kind.value} error after {attempts} attempt(s): {classified.message}"
            )
            self._audit(
                AuditEventType.TASK_FAILED,
                reason=reason,
                detail={"kind": classified.kind.value, "attempts": attempts},
            )
            raise ActionFailed(reason) from error
        self._audit(
            AuditEventType.RETRY_SCHEDULED,
            reason=f"{classified.kind.value} error: {classified.message}; retry in {delay} ms",
            detail={"kind": classified.kind.value, "attempt": attempts, "delay_ms": delay},
        )
        self._republish(headers.next_attempt(), delay)
        raise Retry(
            f"retry in {delay} ms after {classified.kind.value} error", exc=error, when=delay / 1000
        )

    def _record_cooldown(self, headers: GovernanceHeaders, call: LLMCall, wait_ms: int) -> None:
        try:
            set_cooldown(self.runtime.state, headers.context.tenant, call.provider, wait_ms)
        except StoreUnavailable as exc:
            log.warning("could not record the cooldown of %s: %s", call.provider, exc)

    # -- outcomes that end the task without running its body ---------------------------------

    def _deny(self, reason: str) -> NoReturn:
        self._audit(AuditEventType.AUTHORIZATION_DENIED, reason=reason, decision="deny")
        raise ActionDenied(reason)

    def _finish_without_running(
        self, event_type: AuditEventType, outcome: str, decision: Decision
    ) -> NoReturn:
        assert self.action is not None
        result = {
            "governance": outcome,
            "action": self.action.name,
            "tier": decision.tier.value if decision.tier else None,
            "reason": decision.reason,
            "would_run": self.action.model_dump(mode="json"),
        }
        self._audit(event_type, reason=decision.reason, detail={"would_run": result["would_run"]})
        if event_type is AuditEventType.SUGGESTED and self.headers is not None:
            try:  # listed for reviewers as a non-blocking suggestion
                Approvals(self.task.app, self.runtime).hold(
                    task_name=self.task.name,
                    task_id=self.task_id,
                    args=list(self.args),
                    kwargs=self.kwargs,
                    headers=self.headers,
                    action=self.action,
                    decision=decision,
                    blocking=False,
                )
            except StoreUnavailable:
                log.warning("suggestion %s could not be listed", self.task_id, exc_info=True)
        self.task.backend.mark_as_done(self.task_id, result, request=self.task.request)
        self._send_event(outcome, decision.reason)
        raise Ignore()

    def _defer(self, tenant: TenantPolicy, wait_ms: int, violation: str, reason: str) -> NoReturn:
        assert self.headers is not None
        policy = tenant.deferral
        jitter = int(_rng.uniform(0, policy.jitter_ratio * wait_ms))
        delay = policy.delay_ms(self.headers.deferrals, _rng, min_delay_ms=wait_ms + jitter)
        if delay is None:
            message = (
                f"deferred {self.headers.deferrals} times without being admitted "
                f"(max_deferrals {policy.max_deferrals}); last reason: {reason}"
            )
            self._audit(AuditEventType.TASK_FAILED, reason=message, detail={"violation": violation})
            raise LimitExceeded(message)
        self._audit(
            AuditEventType.DEFERRED,
            reason=reason,
            detail={
                "violation": violation,
                "delay_ms": delay,
                "deferrals": self.headers.deferrals + 1,
            },
        )
        how = self._republish(self.headers.deferred(), delay)
        meta = {"reason": reason, "violation": violation, "delay_ms": delay, "via": how}
        self.task.update_state(state="DEFERRED", meta=meta)
        self._send_event("deferred", reason, violation=violation, delay_ms=delay)
        raise Ignore()

    # -- reporting ---------------------------------------------------------------------------

    def _republish(self, headers: GovernanceHeaders, delay_ms: int) -> str:
        return republish(
            self.task.app,
            self.runtime.parking,
            task_name=self.task.name,
            task_id=self.task_id,
            args=self.args,
            kwargs=self.kwargs,
            headers=headers,
            delay_ms=delay_ms,
            countdown_limit_s=self.runtime.settings.countdown_limit_s,
        )

    def _audit(
        self,
        *types: AuditEventType,
        reason: str = "",
        decision: str = "",
        detail: dict[str, Any] | None = None,
        required: bool = False,
    ) -> None:
        ctx = self.headers.context if self.headers else None
        d = self.decision
        events = [
            AuditEvent(
                type=t,
                tenant=ctx.tenant if ctx else "",
                agent=ctx.agent if ctx else "",
                run=ctx.run if ctx else "",
                task_id=self.task_id,
                action=self.action.name if self.action else self.task.name,
                decision=decision or (d.outcome.value if d else ""),
                reason=reason,
                tier=d.tier.value if d and d.tier else "",
                detail=detail or {},
            )
            for t in types
        ]
        self.runtime.audit(*events, required=required)

    def _send_event(self, kind: str, reason: str, **extra: Any) -> None:
        ctx = self.headers.context if self.headers else None
        action = self.action.name if self.action else self.task.name
        try:
            fields = flower_fields(kind, event_fields(ctx, action, reason, **extra))
            self.task.send_event(f"task-{kind}", retry=False, **fields)
        except Exception:
            log.warning("could not send task-%s for %s", kind, self.task_id, exc_info=True)
