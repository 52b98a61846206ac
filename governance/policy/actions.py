"""What an agent wants to do: a tool call or an LLM call, the two kinds of governed action.

Both are pydantic models with a `kind` discriminator so they survive a JSON round trip through a
Celery message (`parse_action`), and both can hash their input to spot the same step repeated.
"""

from __future__ import annotations

import hashlib
import json
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


#: Tokens counted for each message on top of its content: the chat template's framing and the
#: role (OpenAI's template adds 3 plus the role's 1, Llama 3's 5 plus the role's 1).
MESSAGE_OVERHEAD_TOKENS = 8

#: Tokens counted once per call: a begin-of-text token and the primer of the reply (OpenAI's
#: ``<|start|>assistant<|message|>`` is 3, Llama 3's assistant header 4).
CALL_OVERHEAD_TOKENS = 8


def estimate_input_tokens(messages: Sequence[Message]) -> int:
    """An upper bound of the prompt tokens of `messages`, before any provider runs.

    Each message counts the UTF-8 bytes of its content plus `MESSAGE_OVERHEAD_TOKENS`, and the
    call `CALL_OVERHEAD_TOKENS` once. Why bytes: the tokenizers of the models we govern are
    byte-level BPE (OpenAI's cl100k and o200k, GPT-2, Llama 3, Qwen) or SentencePiece with byte
    fallback (Llama 2, Mistral, Gemma), and none of them has a token for less than one byte of
    input, so a text of n bytes is at most n tokens (SentencePiece may add one word-boundary
    token, which the overhead covers). No tighter bound holds without the model's vocabulary:
    ``"a\n" * n`` is one token per byte under cl100k and o200k, and a rare CJK character (4
    bytes) is 3-4 tokens. The budget must hold whatever an agent sends, so the bound is the
    worst case, not the typical one (ceil(chars / 4), the estimate before, was below the real
    count for Korean, for code and for text with addresses or numbers).

    The price is a generous reservation: typical English prose and source code are about 4-5
    bytes per token, CJK text about 3; settlement gives back whatever the provider reports it
    did not use. It needs no tokenizer, is cheap, and gives the same number on every worker.
    `tests/policy/test_policy_estimate.py` checks the bound against cl100k and o200k for
    prose, code, CJK and arbitrary text.
    """
    return CALL_OVERHEAD_TOKENS + sum(
        _utf8_length(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


def _utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8; a lone surrogate (which JSON can carry) counts its 3 bytes."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
