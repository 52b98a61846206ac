"""The outcome rules of an attempt, in-process: no Redis, no Celery worker.

Each branch of ``worker.outcome``: finished, the tenant's backoff, permanent errors, retries
exhausted by the policy or by the task's own ``max_retries``, ``self.retry()`` (governed and
Celery's own ``Retry``), ``Retry-After``, interruptions, and what a settlement counts when the
outcome of a call is unknown.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from celery.exceptions import Retry

from governance.integration.audit_fields import audit_template
from governance.integration.errors import RETRIES_EXHAUSTED, GovernedRetry
from governance.integration.worker.outcome import (
    FAILED,
    FINISHED,
    RETRY_SCHEDULED,
    AttemptOutcome,
    attempt_outcome,
    base_usage,
    counted_usage,
    step_timeout_error,
    unknown_outcome,
    when_s,
)
from governance.policy.actions import LLMCall, Message, ToolCall
from governance.policy.context import ActionContext
from governance.policy.errors import ActionError, ErrorKind
from governance.policy.retry import RetryPolicy
from governance.policy.usage import Usage

RETRY = RetryPolicy(max_retries=2, backoff_base_ms=100, backoff_cap_ms=1000)


def outcome(
    error: BaseException | None, attempt: int = 0, retry: RetryPolicy = RETRY
) -> AttemptOutcome:
    return attempt_outcome(
        error, attempt=attempt, retry=retry, detail={"attempt": attempt}, rng=random.Random(1)
    )


def test_a_body_that_returned_finishes() -> None:
    result = outcome(None)
    assert result.entry == {"type": FINISHED, "decision": "allow", "detail": {"attempt": 0}}
    assert result.error is None
    assert result.retry_delay_ms is None


def test_a_transient_error_backs_off_exponentially_until_the_policy_gives_up() -> None:
    error = ActionError.transient("timeout")
    first, second, third = outcome(error, 0), outcome(error, 1), outcome(error, 2)
    assert (first.retry_delay_ms, second.retry_delay_ms) == (100, 200)
    assert first.entry["type"] == RETRY_SCHEDULED
    assert first.entry["reason"] == "transient error: timeout; retry in 100 ms"
    assert first.entry["detail"] == {"attempt": 0, "kind": "transient", "delay_ms": 100}
    assert third.retry_delay_ms is None
    assert third.entry["type"] == FAILED
    assert third.failure == "transient error after 3 attempt(s): timeout"


def test_a_permanent_error_fails_at_once_and_any_exception_counts_as_permanent() -> None:
    assert outcome(ActionError.permanent("bad input")).failure == (
        "permanent error after 1 attempt(s): bad input"
    )
    crashed = outcome(KeyError("x"))
    assert crashed.entry["type"] == FAILED
    assert crashed.failure == "permanent error after 1 attempt(s): KeyError: 'x'"
    assert crashed.entry["detail"]["kind"] == "permanent"


def test_retries_exhausted_by_the_tasks_own_max_retries_fail_whatever_the_policy_allows() -> None:
    error = ActionError.transient("flaky")
    setattr(error, RETRIES_EXHAUSTED, True)
    result = outcome(error, 0)
    assert result.retry_delay_ms is None
    assert result.entry["type"] == FAILED


def test_a_rate_limited_error_waits_its_retry_after_and_records_a_cooldown() -> None:
    error = ActionError.rate_limited("429", retry_after_ms=7000)
    result = outcome(error)
    assert result.retry_delay_ms == 7000
    assert result.cooldown is error
    assert outcome(ActionError.transient("x")).cooldown is None


def test_a_rate_limited_error_after_the_last_retry_fails_but_still_records_its_cooldown() -> None:
    error = ActionError.rate_limited("429", retry_after_ms=7000)
    result = outcome(error, attempt=2)
    assert result.entry["type"] == FAILED
    assert result.cooldown is error


def test_self_retry_takes_the_tasks_delay_or_the_providers_retry_after_if_longer() -> None:
    governed = outcome(GovernedRetry(ActionError.transient("later"), 1.5))
    assert governed.retry_delay_ms == 1500
    assert governed.entry["reason"] == "retry requested by the task: later; retry in 1500 ms"
    limited = ActionError.rate_limited("429", retry_after_ms=9000)
    waited = outcome(GovernedRetry(limited, 1.0))
    assert (waited.retry_delay_ms, waited.cooldown) == (9000, limited)
    celery_retry = outcome(Retry("again", exc=ValueError("v"), when=2))
    assert celery_retry.retry_delay_ms == 2000
    assert celery_retry.cooldown is None


def test_an_interruption_fails_the_attempt_with_what_interrupted_it() -> None:
    result = outcome(KeyboardInterrupt(), attempt=1)
    assert result.failure == "interrupted (KeyboardInterrupt) during attempt 2"
    assert result.retry_delay_ms is None


def test_when_s_reads_seconds_or_a_time_and_never_goes_negative() -> None:
    assert when_s(Retry(when=None)) == 0.0
    assert when_s(Retry(when=3)) == 3.0
    assert when_s(Retry(when=datetime.now(UTC) - timedelta(seconds=5))) == 0.0
    later = when_s(Retry(when=datetime.now(UTC) + timedelta(seconds=60)))
    assert 58 < later <= 60


ESTIMATE = Usage(steps=1, input_tokens=100, output_tokens=200, cost_micro_usd=500)


def test_what_the_body_reported_is_counted_and_an_excess_is_recorded() -> None:
    counted, spend = counted_usage(Usage(steps=1, output_tokens=50), ESTIMATE, None, None)
    assert counted == Usage(steps=1, output_tokens=50)
    assert spend == {}
    over = Usage(steps=1, output_tokens=250)
    assert counted_usage(over, ESTIMATE, None, None) == (over, {"excess": {"output_tokens": 50}})


def test_an_unknown_outcome_counts_at_least_the_whole_reservation() -> None:
    reported = Usage(steps=1, input_tokens=300)
    counted, spend = counted_usage(reported, ESTIMATE, "no usage in the answer", None)
    assert counted == Usage(steps=1, input_tokens=300, output_tokens=200, cost_micro_usd=500)
    assert spend == {"spend": "assumed", "spend_reason": "no usage in the answer"}
    lost = ActionError.transient("read timeout", outcome_unknown=True)
    assert counted_usage(Usage(steps=1), ESTIMATE, None, lost)[1]["spend_reason"] == (
        "outcome unknown: read timeout"
    )
    assert unknown_outcome(GovernedRetry(lost, 1)) == "outcome unknown: read timeout"
    assert unknown_outcome(ActionError.transient("refused")) is None


def test_a_step_timeout_is_an_error_of_the_tenants_kind_whose_outcome_is_unknown() -> None:
    error = step_timeout_error(timedelta(seconds=30), ErrorKind.transient, 30512.0)
    assert error.kind is ErrorKind.transient
    assert error.outcome_unknown
    assert error.message == "step_timeout: the step ran 30.5 s, over its step timeout of 30 s"
    assert "its time limit" in step_timeout_error(None, ErrorKind.permanent, 1).message


def test_every_attempt_counts_a_step_and_a_tool_call_counts_one_more() -> None:
    assert base_usage(ToolCall(tool="search", input={})) == Usage(steps=1, tool_calls=1)
    llm = LLMCall(
        provider="p", model="m", messages=[Message(role="user", content="hi")], max_tokens=5
    )
    assert base_usage(llm) == Usage(steps=1)


@pytest.mark.parametrize("tier", [None, "act_auto"])
def test_the_audit_template_names_the_task_and_its_tier_when_known(tier: str | None) -> None:
    ctx = ActionContext(tenant="acme", agent="a", run="r")
    template = audit_template(ctx, "t1", ToolCall(tool="search", input={}), "v1", tier)
    assert template["task_id"] == "t1"
    assert template["action"] == "search"
    assert ("tier" in template) is (tier is not None)
