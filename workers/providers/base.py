"""What an LLM provider is: something that completes an `LLMCall` and reports the tokens it used.

Providers raise classified `ActionError`s, so the retry policy can tell a 429 (wait Retry-After)
from a 5xx (back off) from a bad request (give up) without knowing which provider it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from governance.policy.actions import LLMCall
from governance.policy.usage import Usage

__all__ = ["Completion", "Provider"]


@dataclass(frozen=True)
class Completion:
    """The answer of a provider and the tokens it reports, which settle the budget reservation."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    finish_reason: str

    def __post_init__(self) -> None:
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0 (got {self.input_tokens}, {self.output_tokens})"
            )

    def token_usage(self) -> Usage:
        """The tokens as a `Usage`; steps and cost are counted by the caller, who knows prices."""
        return Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens)


class Provider(Protocol):
    """An LLM provider; `name` is what policies allow, limit and cool down."""

    name: str

    def complete(self, call: LLMCall, *, attempt: int) -> Completion:
        """Run the chat completion. `attempt` is 0 on the first try (Celery's `request.retries`).

        Raises `ActionError` (permanent, transient or rate_limited) for every failure.
        """
        ...

    def close(self) -> None:
        """Release connections; the provider is not used afterwards."""
        ...
