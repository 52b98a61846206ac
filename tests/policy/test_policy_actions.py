"""ToolCall / LLMCall: names, kinds, input hashes, validation and the token estimate."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from governance.policy import (
    LLM_CALL_CLASS,
    LLMCall,
    Message,
    ToolCall,
    estimate_input_tokens,
    parse_action,
)


def chat(content: str = "hi", **fields: object) -> LLMCall:
    data: dict[str, object] = {
        "provider": "fake",
        "model": "fake-small",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 10,
    }
    data.update(fields)
    return LLMCall.model_validate(data)


def test_tool_call_name_and_kind() -> None:
    call = ToolCall(tool="echo", input={"text": "hi"})
    assert (call.name, call.kind) == ("echo", "tool")


def test_llm_call_name_is_the_provider_and_kind_llm() -> None:
    call = chat()
    assert (call.name, call.kind) == ("fake", "llm")
    assert LLM_CALL_CLASS == "llm.call"


def test_tool_input_hash_ignores_key_order() -> None:
    a = ToolCall(tool="echo", input={"a": 1, "b": {"x": [1, 2], "y": None}})
    b = ToolCall(tool="echo", input={"b": {"y": None, "x": [1, 2]}, "a": 1})
    assert a.input_hash() == b.input_hash()
    assert len(a.input_hash()) == 64


def test_tool_input_hash_changes_with_input() -> None:
    assert (
        ToolCall(tool="echo", input={"a": 1}).input_hash()
        != ToolCall(tool="echo", input={"a": 2}).input_hash()
    )


def test_same_input_to_different_tools_hashes_differently() -> None:
    same = {"path": "/tmp/x"}
    assert (
        ToolCall(tool="read_file", input=same).input_hash()
        != ToolCall(tool="delete_file", input=same).input_hash()
    )


def test_llm_input_hash_covers_model_messages_and_max_tokens() -> None:
    base = chat().input_hash()
    assert chat().input_hash() == base
    assert chat(model="fake-large").input_hash() != base
    assert chat(content="other").input_hash() != base
    assert chat(max_tokens=11).input_hash() != base


def test_llm_call_needs_a_message() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        chat(messages=[])


@pytest.mark.parametrize("max_tokens", [0, 1_000_001])
def test_llm_max_tokens_bounds(max_tokens: int) -> None:
    with pytest.raises(ValidationError, match="max_tokens"):
        chat(max_tokens=max_tokens)


def test_llm_max_tokens_upper_bound_is_inclusive() -> None:
    assert chat(max_tokens=1_000_000).max_tokens == 1_000_000


def test_unknown_message_role_is_rejected() -> None:
    with pytest.raises(ValidationError, match="role"):
        Message.model_validate({"role": "wizard", "content": "x"})


def test_tool_input_must_be_json_serializable() -> None:
    with pytest.raises(ValidationError, match="JSON-serializable"):
        ToolCall(tool="echo", input={"when": object()})


def test_empty_tool_name_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ToolCall(tool="")


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ([""], 8 + 8),  # the call's overhead, the message's overhead, 0 bytes
        (["abcd"], 8 + 8 + 4),
        (["abcdé"], 8 + 8 + 6),  # é is two bytes in UTF-8
        (["a" * 400, "b"], 8 + 8 + 400 + 8 + 1),
    ],
)
def test_estimate_input_tokens(contents: list[str], expected: int) -> None:
    messages = [Message(role="user", content=c) for c in contents]
    assert estimate_input_tokens(messages) == expected


def test_actions_round_trip_through_a_dict() -> None:
    t = ToolCall(tool="echo", input={"x": 1})
    c = chat()
    assert parse_action(t.model_dump()) == t
    assert parse_action(c.model_dump()) == c
    assert isinstance(parse_action(c.model_dump(mode="json")), LLMCall)
