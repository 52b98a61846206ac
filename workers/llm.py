"""The LLM call as a governed Celery task: ``llm.complete(provider, model, messages, max_tokens)``.

Admission reserves the call's estimate (an upper bound of its input plus ``max_tokens``, priced
from the policy's table); the task reports the tokens the provider actually used and their cost,
and settlement replaces the reservation with them. When they cannot be known, the reservation
is spent: the provider answered without usage (the task says so with ``report_usage_unknown``),
or the request was sent and its outcome is unknown (the provider raises an ``ActionError`` with
``outcome_unknown``, which the settlement reads).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from governance.integration import (
    GovernedLLMTask,
    current_execution,
    report_usage,
    report_usage_unknown,
    runtime_for,
)
from governance.policy.actions import LLMCall
from governance.policy.usage import Usage
from governance.settings import GovernanceSettings
from workers.providers import Provider, build_provider

LLM_TASK_NAME = "llm.complete"


class LLMTask(GovernedLLMTask):
    """A governed task calling one LLM provider."""

    settings: GovernanceSettings
    _providers: dict[str, Provider]

    def provider(self, name: str) -> Provider:
        providers: dict[str, Provider] = self.__dict__.setdefault("_providers", {})
        if name not in providers:
            key = self.settings.llm_api_key
            providers[name] = build_provider(
                name,
                base_url=self.settings.llm_base_url,
                api_key=key.get_secret_value() if key else None,
                timeout_s=self.settings.llm_timeout_s,
            )
        return providers[name]

    def complete(self, call: LLMCall) -> dict[str, Any]:
        execution = current_execution()
        assert execution is not None, "the LLM body runs inside a governed execution"
        completion = self.provider(call.provider).complete(call, attempt=execution.attempt)
        cost: int | None = None
        report_usage(completion.token_usage())
        if completion.input_tokens is None or completion.output_tokens is None:
            report_usage_unknown(f"{call.provider} answered without token usage")
        else:
            try:
                cost = runtime_for(self.app).policy.cost_micro_usd(
                    call.provider, call.model, completion.input_tokens, completion.output_tokens
                )
            except ValueError as exc:
                # The policy reloaded meanwhile has no price for it: the call was made (and
                # billed), so its whole reservation, priced at admission, counts.
                report_usage_unknown(f"cannot price the answer: {exc}")
            else:
                report_usage(Usage(cost_micro_usd=cost))
        return {
            "text": completion.text,
            "model": completion.model,
            "finish_reason": completion.finish_reason,
            "usage": {
                "input_tokens": completion.input_tokens,
                "output_tokens": completion.output_tokens,
            },
            # Unknown without usage: the settlement counts the call's whole reservation.
            "cost_usd": None if cost is None else cost / 1_000_000,
            "spend": "reported" if cost is not None else "assumed",
        }


def register_llm_task(app: Celery, settings: GovernanceSettings) -> LLMTask:
    """Register ``llm.complete`` on ``app``."""

    def body(self: LLMTask, **kwargs: Any) -> dict[str, Any]:
        execution = current_execution()
        assert execution is not None, "the LLM body runs inside a governed execution"
        assert isinstance(execution.action, LLMCall)  # built from these kwargs by build_action
        return self.complete(execution.action)

    task: LLMTask = app.task(
        body, name=LLM_TASK_NAME, base=LLMTask, bind=True, shared=False, settings=settings
    )
    return task
