"""The worker-side request class of governed tasks: step timeouts, and governance failures
named for Flower.

**Step timeouts.** The policy's ``step_timeout`` of the action (its tool's or provider's, else
its tenant's) becomes Celery's soft time limit of the task, and the soft limit plus
``HARD_LIMIT_GRACE_S`` its hard limit, set here in the worker's main process when the message
is received (a limit the publisher sent can only be lower). The body gets Celery's
``SoftTimeLimitExceeded``, and the task settles as a step timeout (see
``outcome.step_timeout_error``). A body that ignores it is killed at the hard limit; the pool's
timeout handler (here, in the main process) then settles the attempt for it: lease and
reservation released, the reservation counted as spent, a ``task_failed`` audit entry.

**Flower.** Celery reports every exception as ``task-failed``; a denial is not a crash, so this
request reports a task that ended with :class:`ActionDenied` as ``task-denied`` (state DENIED in
Flower), and one that ended with :class:`ApprovalRejected` as ``task-rejected``, each with the
reason in ``result`` too (the column Flower's task list shows for every governance state). Any
other failure keeps ``task-failed`` (FAILURE) with its reason in ``result`` as well: a limit
names the policy setting behind it (``limit: same_step_loop exceeded: 4 / 3 (133%) (policy:
long_running.max_same_step_repetitions)``). The result backend still says FAILURE with the
reason, as callers expect.

**Tenants.** Its events carry the governed task's tenant (Flower's tenant column).

**Events only while a monitor asks.** Each governed task goes to the pool with whether its
worker's task events are on (:data:`~governance.integration.monitor.REQUEST_FIELD`): the pool
process sends the layer's own events (``task-deferred``, ``task-held``, ...) only then.

**Durable acknowledgements.** A delivery that left its task only in the state Redis ends with
``AckWhenDurable`` (with ``GOVERNANCE_STATE_DURABILITY`` set): its message is acknowledged here,
in the main process, once the task's record is confirmed durable (``worker.durable_ack``).

**Secrets.** The worker's events (``task-received``: Flower's args and kwargs) and its log
lines show a message's ``argsrepr``/``kwargsrepr``; for a governed task whose call has
secret-named values, they are the call with those values redacted, whoever published it.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import Any

from celery.worker.request import Request
from celery.worker.state import task_ready

from governance.integration.audit_fields import audit_template
from governance.integration.events import failure_summary
from governance.integration.governed import is_governed
from governance.integration.headers import CONTEXT, header_value, read_context
from governance.integration.monitor import REQUEST_FIELD
from governance.integration.redaction import redact
from governance.integration.runtime import GovernanceRuntime, installed_on, runtime_for
from governance.integration.worker.durable_ack import AckWhenDurable, defer_ack
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.tenant import TenantPolicy
from governance.store.admission import AdmissionTicket

log = logging.getLogger("governance.request")

#: How long after its soft time limit (the step timeout) a step is killed.
HARD_LIMIT_GRACE_S = 2.0

#: Exception class name (as it appears in the event's repr) -> governance event name.
_FAILURE_EVENTS = {"ActionDenied": "task-denied", "ApprovalRejected": "task-rejected"}


def reason_of(exception_repr: str) -> str:
    """The reason inside an exception's repr, e.g. ``ActionDenied('no')`` -> ``no``."""
    _, _, inner = exception_repr.partition("(")
    inner = inner.removesuffix(")").removesuffix(",")
    try:
        value = ast.literal_eval(inner)
    except (ValueError, SyntaxError):
        return exception_repr
    return value if isinstance(value, str) else exception_repr


@dataclass(frozen=True)
class _Step:
    """What the main process knows of a governed request's step."""

    runtime: GovernanceRuntime
    context: ActionContext
    action: Action
    tenant: TenantPolicy
    timeout_s: float | None


class GovernedRequest(Request):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redact_reprs()
        # The pool applies ``time_limits`` (Celery's request class for each task reads them
        # when it hands the task to the pool).
        step = self._step(only_with_timeouts=True)
        if step is not None and step.timeout_s is not None:
            hard, soft = getattr(self, "time_limits", None) or (None, None)
            soft = min(x for x in (soft, self.task.soft_time_limit, step.timeout_s) if x)
            killed_at = soft + HARD_LIMIT_GRACE_S
            self.time_limits = (min(hard, killed_at) if hard else killed_at, soft)

    @property
    def request_dict(self) -> dict[str, Any]:
        """What the pool gets of this request (Celery's request class for each task hands it
        over): with whether the worker's task events are on now, which the pool process follows
        (see ``integration.monitor``)."""
        found: dict[str, Any] = self._request_dict
        runtime = installed_on(self.task.app)
        found[REQUEST_FIELD] = runtime is not None and runtime.events.wanted()
        return found

    def _redact_reprs(self) -> None:
        """The call as events and logs show it: secret-named values redacted (the publisher
        does the same for the messages it sends; this covers any other)."""
        if not is_governed(self.task):
            return
        for field, value in (("argsrepr", self._args), ("kwargsrepr", self._kwargs)):
            if not isinstance(value, list | tuple | dict):
                continue
            redacted = redact(list(value) if isinstance(value, tuple) else value)
            if redacted != value:
                setattr(self, f"_{field}", repr(redacted))
                self._request_dict[field] = repr(redacted)

    def _tenant(self) -> str:
        """The tenant a governed request's context names ("" otherwise), read once."""
        cached: str | None = getattr(self, "_governed_tenant", None)
        if cached is None:
            cached = ""
            if is_governed(self.task):
                try:
                    cached = read_context(header_value(self._request_dict, CONTEXT)).tenant
                except Exception:  # a malformed context: the task itself denies it
                    cached = ""
            self._governed_tenant = cached
        return cached

    def _step(self, only_with_timeouts: bool = False) -> _Step | None:
        """The policy's view of this request, or None when it is not governed or its
        context, action or tenant is not valid (the task itself then denies it). With
        ``only_with_timeouts``, None at once when the policy has no step timeout at all (the
        cost of a message in the main process stays what it was)."""
        task = self.task
        if not is_governed(task):
            return None
        try:
            runtime = runtime_for(task.app)
        except RuntimeError:  # no governance installed: the task itself says so
            return None
        if only_with_timeouts and not runtime.policy.has_step_timeouts:
            return None
        try:
            context = read_context(header_value(self._request_dict, CONTEXT))
            action = task.action_for(self.args, self.kwargs)
        except Exception:
            return None
        tenant = runtime.policy.tenant(context.tenant)
        if tenant is None:
            return None
        limit = runtime.policy.step_timeout(tenant, action)
        return _Step(runtime, context, action, tenant, limit.total_seconds() if limit else None)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """A delivery whose message is acknowledged once its record is durable
        (:class:`AckWhenDurable`, an ``Ignore``) is handed to the confirmations; anything else
        as Celery does."""
        # Celery's ExceptionWithTraceback (from a pool process) wraps it as ``exc``.
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, AckWhenDurable):
            task_ready(self)  # as Celery does first for every ending
            defer_ack(self, exc)
            return
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            try:
                self._settle_killed_step(timeout)
            except Exception:
                log.warning(
                    "could not settle task %s after its hard time limit; its lease expires",
                    self.id,
                    exc_info=True,
                )

    def _settle_killed_step(self, timeout: float) -> None:
        """The pool killed the step at its hard time limit: settle the attempt for it."""
        step = self._step()
        if step is None:
            return
        runtime, ctx, action = step.runtime, step.context, step.action
        attempt = int(self._request_dict.get("retries") or 0)
        limits = runtime.limits_for(step.tenant, action)
        template = audit_template(ctx, self.id, action, runtime.policy.version)
        ticket = AdmissionTicket.of(ctx, self.id, attempt, "", limits, template)
        reason = f"step_timeout: killed at its hard time limit of {timeout:g} s"
        entry = {
            "type": "task_failed",
            "decision": "allow",
            "reason": reason,
            "detail": {"attempt": attempt, "spend": "assumed", "spend_reason": reason},
        }
        with runtime.health.call():
            settlement = runtime.admitter.settle_killed(
                ticket, runtime.policy.estimate_usage(action), entry=entry
            )
        runtime.publish_each(settlement.publish)

    def send_event(self, type: str, **fields: Any) -> None:
        tenant = self._tenant()
        if tenant:
            fields.setdefault("tenant", tenant)  # Flower's tenant column
        if type == "task-failed":
            exception = str(fields.get("exception", ""))
            name = exception.split("(", 1)[0]
            renamed = _FAILURE_EVENTS.get(name)
            if renamed is not None:
                type = renamed
                fields.setdefault("result", f"{renamed[5:]}: {reason_of(exception)}")
            else:
                fields.setdefault("result", failure_summary(exception, reason_of(exception)))
        super().send_event(type, **fields)
