"""How an attempt ended, decided before it settles: pure rules, no Redis and no Celery calls.

Given what the body did (its result or exception), the tenant's retry policy and what the body
reported, these functions decide the attempt's audit entry and what follows: finished, failed
(with the classified reason), or a retry after a delay (the task's own ``self.retry()``, or the
tenant's backoff, or a provider's ``Retry-After``); and what the settlement counts (what the body
reported, or the whole reservation when the outcome of the call is unknown). The delivery
(:mod:`governance.integration.worker.delivery`) only carries these decisions out.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery.exceptions import Retry

from governance.integration.errors import RETRIES_EXHAUSTED, GovernedRetry
from governance.policy.actions import Action, ToolCall
from governance.policy.errors import ActionError, ErrorKind
from governance.policy.retry import RetryPolicy
from governance.policy.usage import Usage
from governance.store.audit import AuditEventType

FINISHED = AuditEventType.TASK_FINISHED.value
FAILED = AuditEventType.TASK_FAILED.value
RETRY_SCHEDULED = AuditEventType.RETRY_SCHEDULED.value


def base_usage(action: Action) -> Usage:
    """What every attempt counts before the body reports more: one step (and one tool call)."""
    return Usage(steps=1, tool_calls=1 if isinstance(action, ToolCall) else 0)


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended, decided before it settles: its audit entry, and what follows.

    ``error``: what the task ends (or retries) with; ``retry_delay_ms``: a retry follows after
    this long; ``failure``: the governance reason of a failure; ``cooldown``: a rate-limited
    error whose ``Retry-After`` the provider's cooldown must record.
    """

    entry: dict[str, Any]
    error: BaseException | None = None
    retry_delay_ms: int | None = None
    failure: str = ""
    cooldown: ActionError | None = None


def attempt_outcome(
    error: BaseException | None,
    *,
    attempt: int,
    retry: RetryPolicy,
    detail: dict[str, Any],
    rng: random.Random,
) -> AttemptOutcome:
    """The outcome of attempt ``attempt`` (0-based) that ended with ``error`` (None: it
    returned), under the tenant's ``retry`` policy; ``detail`` goes into its audit entry."""
    attempts = attempt + 1
    if error is None:
        return AttemptOutcome({"type": FINISHED, "decision": "allow", "detail": detail})
    if not isinstance(error, Exception):
        reason = f"interrupted ({type(error).__name__}) during attempt {attempts}"
        return _failed(reason, error, detail)
    if isinstance(error, GovernedRetry | Retry):
        cause = error.exc if isinstance(error.exc, BaseException) else error
        delay_s = error.delay_s if isinstance(error, GovernedRetry) else when_s(error)
        delay = round(delay_s * 1000)
        cooldown = None
        if isinstance(cause, ActionError) and cause.kind is ErrorKind.rate_limited:
            delay = max(delay, cause.retry_after_ms or 0)
            cooldown = cause
        return _retry(f"retry requested by the task: {cause}", delay, error, detail, cooldown)
    classified = (
        error
        if isinstance(error, ActionError)
        else ActionError.permanent(f"{type(error).__name__}: {error}")
    )
    cooldown = classified if classified.kind is ErrorKind.rate_limited else None
    exhausted = getattr(error, RETRIES_EXHAUSTED, False)
    planned = None if exhausted else retry.delay_ms(classified, attempt, rng)
    detail = {**detail, "kind": classified.kind.value}
    if planned is None:
        reason = f"{classified.kind.value} error after {attempts} attempt(s): {classified.message}"
        return _failed(reason, error, detail, cooldown)
    reason = f"{classified.kind.value} error: {classified.message}"
    return _retry(reason, planned, error, detail, cooldown)


def _failed(
    reason: str,
    error: BaseException,
    detail: dict[str, Any],
    cooldown: ActionError | None = None,
) -> AttemptOutcome:
    return AttemptOutcome(
        {"type": FAILED, "decision": "allow", "reason": reason, "detail": detail},
        error=error,
        failure=reason,
        cooldown=cooldown,
    )


def _retry(
    reason: str,
    delay_ms: int,
    error: BaseException,
    detail: dict[str, Any],
    cooldown: ActionError | None,
) -> AttemptOutcome:
    return AttemptOutcome(
        {
            "type": RETRY_SCHEDULED,
            "decision": "allow",
            "reason": f"{reason}; retry in {delay_ms} ms",
            "detail": {**detail, "delay_ms": delay_ms},
        },
        error=error,
        retry_delay_ms=delay_ms,
        cooldown=cooldown,
    )


def counted_usage(
    reported: Usage, estimate: Usage, usage_unknown: str | None, error: BaseException | None
) -> tuple[Usage, dict[str, Any]]:
    """What the attempt counts at settlement, and what its audit entry says about it.

    What the body reported, normally. When what the call used cannot be known (the body said
    so with ``report_usage_unknown``, given here as ``usage_unknown``, or raised an
    ``ActionError`` with ``outcome_unknown``: a timeout after the request was sent, a lost
    connection), at least the attempt's whole reservation ``estimate``: the provider may have
    billed it, and counting it keeps a budget from being exceeded by calls that fail that way,
    on every attempt (``"spend": "assumed"``). Usage reported above the reservation counts as
    reported, and the entry records the excess (the next admission sees it in the window's
    usage).
    """
    reason = usage_unknown or unknown_outcome(error)
    if reason is not None:
        return reported.at_least(estimate), {"spend": "assumed", "spend_reason": reason}
    excess = reported.excess_over(estimate)
    return reported, ({"excess": excess} if excess else {})


def step_timeout_error(limit: timedelta | None, kind: ErrorKind, step_ms: float) -> ActionError:
    """The step ran out of its step timeout (Celery's soft time limit, set from the policy by
    ``GovernedRequest``) after ``step_ms``: a failure of the tenant's ``step_timeout_error``
    kind, whose outcome is unknown (the step may have done part of its work, an LLM provider may
    have billed the call), so its reservation counts as spent."""
    limit_text = f"{limit.total_seconds():g} s" if limit else "its time limit"
    return ActionError(
        f"step_timeout: the step ran {step_ms / 1000:.1f} s, over its step timeout of {limit_text}",
        kind,
        outcome_unknown=True,
    )


def unknown_outcome(error: BaseException | None) -> str | None:
    """Why the attempt's spend is unknown, when the body ended with an ``ActionError`` (raised,
    or given to a retry) whose request was sent and whose outcome is unknown; else None."""
    if isinstance(error, GovernedRetry | Retry):
        error = error.exc if isinstance(error.exc, BaseException) else None
    if isinstance(error, ActionError) and error.outcome_unknown:
        return f"outcome unknown: {error.message}"
    return None


def when_s(retry: Retry) -> float:
    """The delay of Celery's own ``Retry`` (its ``when``: seconds, or a datetime)."""
    when = retry.when
    if when is None:
        return 0.0
    if isinstance(when, int | float):
        return float(when)
    return max(0.0, float(when.timestamp()) - time.time())
