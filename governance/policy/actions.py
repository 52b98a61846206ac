"""What an agent wants to do: a tool call or an LLM call, the two kinds of governed action.

Both are pydantic models with a `kind` discriminator so they survive a JSON round trip through a
Celery message (`parse_action`), and both can hash their input to spot the same step repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

LLM_CALL_CLASS = "llm.call"
"""The side-effect class of every LLM call (tools get theirs from the config)."""

ActionName = Annotated[str, Field(min_length=1, max_length=128)]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


class ToolCall(BaseModel):
    """A call of a named tool with a JSON-serializable input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["tool"] = "tool"
    tool: ActionName
    input: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input")
    @classmethod
    def _input_is_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Rejected here rather than later: the input must cross the broker as JSON and be hashed.
        try:
            canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tool input must be JSON-serializable: {exc}") from exc
        return value

    @property
    def name(self) -> str:
        """The tool name (what allow-lists, tiers and deny rules match)."""
        return self.tool

    def input_hash(self) -> str:
        """sha256 hex of the canonical JSON of the tool name and its input.

        The name is part of the hash so that the same input given to two different tools (say
        `read_file` and `delete_file` on one path) is not mistaken for one step repeated.
        """
        return _sha256({"tool": self.tool, "input": self.input})


class Message(BaseModel):
    """One chat message of an LLM call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class LLMCall(BaseModel):
    """A chat completion against a provider's model, bounded by `max_tokens` of output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["llm"] = "llm"
    provider: ActionName
    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int = Field(ge=1, le=1_000_000)

    @property
    def name(self) -> str:
        """The provider name (what allow-lists, tiers and deny rules match)."""
        return self.provider

    def input_hash(self) -> str:
        """sha256 hex of the canonical JSON of provider, model, messages and max_tokens."""
        return _sha256(
            {
                "provider": self.provider,
                "model": self.model,
                "messages": [m.model_dump() for m in self.messages],
                "max_tokens": self.max_tokens,
            }
        )


Action = ToolCall | LLMCall
"""Any governed action."""

_ACTION_ADAPTER: TypeAdapter[Action] = TypeAdapter(Annotated[Action, Field(discriminator="kind")])


def parse_action(data: Any) -> Action:
    """Validate a dict (e.g. from `action.model_dump()` in a message) back into an Action."""
    return _ACTION_ADAPTER.validate_python(data)


def estimate_input_tokens(messages: Sequence[Message]) -> int:
    """A deterministic estimate of the prompt tokens of `messages`, before any provider runs.

    Each message counts ceil(len(content) / 4) tokens (about four characters per token for English
    text under common BPE tokenizers) plus 4 for its role and framing. It needs no tokenizer, gives
    the same number on every worker, and errs on the high side for typical prose; the reservation
    it feeds is reconciled with the provider's reported usage afterwards anyway.
    """
    return sum(math.ceil(len(m.content) / 4) + 4 for m in messages)
