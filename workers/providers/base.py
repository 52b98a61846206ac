"""What an LLM provider is: something that completes an `LLMCall` and reports the tokens it used.

Providers raise classified `ActionError`s, so the retry policy can tell a 429 (wait Retry-After)
from a 5xx (back off) from a bad request (give up) without knowing which provider it was, and
the settlement can tell a call that was never sent (nothing spent) from one whose outcome is
unknown (`outcome_unknown`: its whole reservation is counted as spent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from governance.policy.actions import LLMCall
from governance.policy.usage import Usage

__all__ = ["Completion", "Provider"]


@dataclass(frozen=True)
class Completion:
    """The answer of a provider and the tokens it reports, which settle the budget reservation.

    A token count the answer did not carry (or carried as something other than a count) is
    None: what the call used is then unknown, and the task counts its whole reservation.
    """

    text: str
    input_tokens: int | None
    output_tokens: int | None
    model: str
    finish_reason: str

    def __post_init__(self) -> None:
        if (self.input_tokens or 0) < 0 or (self.output_tokens or 0) < 0:
            raise ValueError(
                f"token counts must be >= 0 (got {self.input_tokens}, {self.output_tokens})"
            )

    @property
    def usage_known(self) -> bool:
        """Whether the provider reported both token counts."""
        return self.input_tokens is not None and self.output_tokens is not None

    def token_usage(self) -> Usage:
        """The tokens reported, as a `Usage` (a count not reported is 0); steps and cost are
        counted by the caller, who knows prices."""
        return Usage(input_tokens=self.input_tokens or 0, output_tokens=self.output_tokens or 0)


class Provider(Protocol):
    """An LLM provider; `name` is what policies allow, limit and cool down."""

    name: str

    def complete(self, call: LLMCall, *, attempt: int) -> Completion:
        """Run the chat completion. `attempt` is 0 on the first try (Celery's `request.retries`).

        Raises `ActionError` (permanent, transient or rate_limited) for every failure, with
        `outcome_unknown` when the request was sent and no answer says what became of it (the
        provider may have billed it).
        """
        ...

    def close(self) -> None:
        """Release connections; the provider is not used afterwards."""
        ...
