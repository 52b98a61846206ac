"""LLM spend is counted whatever happens: real workers, the test server as the provider.

A call whose outcome is unknown (a timeout after the request was sent, an answer without usage)
settles its whole reservation as spent; a provider that reports more than was reserved has the
excess counted, and the next admission sees it.
"""

from __future__ import annotations

import json

import pytest
from celery import Celery

from governance.integration import ActionFailed, LimitExceeded
from governance.integration.runtime import GovernanceRuntime
from governance.policy.actions import LLMCall, Message
from governance.policy.context import ActionContext
from governance.policy.usage import Usage
from governance.store import Period, read_usage
from tests.e2e.conftest import audit_of
from tests.e2e.observer import ObserverServer
from workers.api import submit_llm

pytestmark = pytest.mark.timeout(180)


def ctx(tenant: str, run: str = "run-spend") -> ActionContext:
    return ActionContext(tenant=tenant, agent="agent-1", run=run)


def reservation(
    runtime: GovernanceRuntime, provider: str, model: str, text: str, max_tokens: int
) -> Usage:
    """What admission reserves for this call (the policy's estimate, as the worker computes it)."""
    call = LLMCall(
        provider=provider,
        model=model,
        messages=[Message(role="user", content=text)],
        max_tokens=max_tokens,
    )
    return runtime.policy.estimate_usage(call)


def settlement_details(runtime: GovernanceRuntime, task_id: str) -> list[dict[str, object]]:
    """The detail of each settlement entry of the task (finished, failed or retried), in order."""
    return [
        json.loads(e.fields["detail"])
        for e in audit_of(runtime, task_id)
        if e.fields["type"] in ("task_finished", "task_failed", "retry_scheduled")
    ]


def test_an_llm_call_that_times_out_after_it_was_sent_counts_its_reservation(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    """``local-hold`` is received and never answered; the provider times out (2 s here) after
    sending. No retry (``t-spend``): the attempt's reservation stays counted as used."""
    text = "timed out once"
    result = submit_llm(
        app,
        ctx("t-spend"),
        provider="local",
        model="local-hold",
        messages=[{"role": "user", "content": text}],
        max_tokens=100,
    )
    with pytest.raises(ActionFailed, match="timed out after the request was sent"):
        result.get(timeout=60)
    assert observer.observations.counts[f"hold:{text}"] == 1  # it was sent
    reserved = reservation(runtime, "local", "local-hold", text, 100)
    usage = read_usage(runtime.state, "t-spend", Period.DAY)
    assert usage.reserved == Usage()
    assert usage.used.input_tokens == reserved.input_tokens
    assert usage.used.output_tokens == reserved.output_tokens == 100
    assert usage.used.cost_micro_usd == reserved.cost_micro_usd > 0
    (detail,) = settlement_details(runtime, result.id)
    assert detail["spend"] == "assumed"
    assert "outcome unknown" in str(detail["spend_reason"])


def test_a_token_budget_is_never_exceeded_when_every_call_times_out(
    app: Celery, runtime: GovernanceRuntime, observer: ObserverServer
) -> None:
    """``t-spend-budget`` has 1000 tokens a day and the default retries (3). Every attempt of
    every call times out after it was sent and counts its reservation (about 300 tokens): the
    budget admits exactly as many attempts as fit, the rest are refused, and what the provider
    received is exactly what the budget counted."""
    texts = [f"budget call {i}" for i in range(4)]
    calls = [
        submit_llm(
            app,
            ctx("t-spend-budget"),
            provider="local",
            model="local-hold",
            messages=[{"role": "user", "content": text}],
            max_tokens=300,
        )
        for text in texts
    ]
    refused = 0
    for call in calls:
        with pytest.raises((ActionFailed, LimitExceeded)) as raised:
            call.get(timeout=120)
        refused += isinstance(raised.value, LimitExceeded)
    per_attempt = reservation(runtime, "local", "local-hold", texts[0], 300)
    sent = sum(observer.observations.counts[f"hold:{text}"] for text in texts)
    usage = read_usage(runtime.state, "t-spend-budget", Period.DAY)
    assert usage.reserved == Usage()
    assert usage.total_tokens <= 1000
    assert sent == 1000 // (per_attempt.input_tokens + per_attempt.output_tokens)
    assert usage.used.output_tokens == 300 * sent  # every attempt sent was counted in full
    assert refused >= 1


def test_retries_of_a_call_whose_outcome_is_unknown_each_count_their_reservation(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    """The fake provider times out twice after sending, then answers: three attempts, the two
    lost ones counted at their reservation, the last at what the provider reported."""
    text = "[[fail timeout 2]] twice lost"
    result = submit_llm(
        app,
        ctx("t-spend-retry"),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": text}],
        max_tokens=50,
    )
    answer = result.get(timeout=60)
    reserved = reservation(runtime, "fake", "fake-small", text, 50)
    details = settlement_details(runtime, result.id)
    assert [d.get("spend") for d in details] == ["assumed", "assumed", None]
    usage = read_usage(runtime.state, "t-spend-retry", Period.DAY)
    assert usage.used.input_tokens == 3 * reserved.input_tokens  # the fake reports the estimate
    assert usage.used.output_tokens == 2 * 50 + answer["usage"]["output_tokens"]
    assert answer["spend"] == "reported"


def test_an_answer_without_usage_counts_the_whole_reservation(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    text = "no usage please"
    before = read_usage(runtime.state, "t-spend", Period.DAY).used
    result = submit_llm(
        app,
        ctx("t-spend", run="run-no-usage"),
        provider="local",
        model="local-no-usage",
        messages=[{"role": "user", "content": text}],
        max_tokens=40,
    )
    answer = result.get(timeout=60)
    assert answer["text"].startswith("ok:")
    assert answer["spend"] == "assumed"
    assert answer["cost_usd"] is None
    reserved = reservation(runtime, "local", "local-no-usage", text, 40)
    after = read_usage(runtime.state, "t-spend", Period.DAY).used
    assert after.input_tokens - before.input_tokens == reserved.input_tokens
    assert after.output_tokens - before.output_tokens == 40
    assert after.cost_micro_usd - before.cost_micro_usd == reserved.cost_micro_usd
    (detail,) = settlement_details(runtime, result.id)
    assert detail["spend"] == "assumed"
    assert "answered without token usage" in str(detail["spend_reason"])


def test_usage_above_the_reservation_is_counted_and_the_next_call_sees_it(
    app: Celery, runtime: GovernanceRuntime
) -> None:
    """``t-excess`` has 1000 tokens a day. The first call reserves a few dozen tokens and the
    provider reports 900 input tokens: all 900 count, the excess is in the audit entry, and a
    second call that would have fit had only the reservation been counted is refused."""
    first_text = "[[input 900]] more than reserved"
    first = submit_llm(
        app,
        ctx("t-excess"),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": first_text}],
        max_tokens=10,
    )
    answer = first.get(timeout=60)
    reserved = reservation(runtime, "fake", "fake-small", first_text, 10)
    assert answer["usage"]["input_tokens"] == 900
    (detail,) = settlement_details(runtime, first.id)
    assert detail["excess"]["input_tokens"] == 900 - reserved.input_tokens
    used = read_usage(runtime.state, "t-excess", Period.DAY).total_tokens
    assert used == 900 + answer["usage"]["output_tokens"]

    second = submit_llm(
        app,
        ctx("t-excess"),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": "fits beside the reservation only"}],
        max_tokens=1000 - used,  # with its input estimate, over the budget by a few tokens
    )
    with pytest.raises(LimitExceeded, match="token_limit exceeded"):
        second.get(timeout=60)
    assert read_usage(runtime.state, "t-excess", Period.DAY).total_tokens == used
