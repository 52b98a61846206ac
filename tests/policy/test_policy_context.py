"""ActionContext: id validation, defaults, strictness."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from governance.policy import ActionContext


def make(**fields: object) -> ActionContext:
    base: dict[str, object] = {"tenant": "acme", "agent": "bot", "run": "r1"}
    base.update(fields)
    return ActionContext.model_validate(base)


def test_valid_context_keeps_fields_and_defaults() -> None:
    c = make(user="alice@example.com", parent_task_id="task:1", discovery_depth=2)
    assert (c.tenant, c.agent, c.run, c.user) == ("acme", "bot", "r1", "alice@example.com")
    assert c.discovery_depth == 2
    assert c.parent_task_id == "task:1"


def test_trace_id_is_generated_uuid_hex_and_unique() -> None:
    a, b = make(), make()
    assert re.fullmatch(r"[0-9a-f]{32}", a.trace_id)
    assert a.trace_id != b.trace_id


def test_explicit_trace_id_is_kept() -> None:
    assert make(trace_id="trace-123").trace_id == "trace-123"


@pytest.mark.parametrize("field", ["tenant", "agent", "run", "user", "trace_id", "parent_task_id"])
def test_empty_id_is_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="must not be empty") as info:
        make(**{field: ""})
    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("value", ["acme corp", "a/b", "a{b}", "tenant\n", "é"])
def test_id_with_characters_outside_the_charset_is_rejected(value: str) -> None:
    with pytest.raises(ValidationError, match=re.escape("[A-Za-z0-9._:@-]")):
        make(tenant=value)


@pytest.mark.parametrize("value", ["-acme", ".acme", "@acme", ":x"])
def test_id_must_start_with_alphanumeric(value: str) -> None:
    with pytest.raises(ValidationError, match="must start with a letter or a digit"):
        make(agent=value)


def test_id_of_128_chars_is_accepted_and_129_rejected() -> None:
    assert make(run="r" * 128).run == "r" * 128
    with pytest.raises(ValidationError, match="at most 128 characters"):
        make(run="r" * 129)


def test_all_allowed_characters_are_accepted() -> None:
    assert make(agent="A9._:@-z").agent == "A9._:@-z"


def test_negative_discovery_depth_is_rejected() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        make(discovery_depth=-1)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        make(priority=1)


def test_missing_required_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Field required"):
        ActionContext.model_validate({"tenant": "acme", "agent": "bot"})


def test_context_is_frozen() -> None:
    c = make()
    with pytest.raises(ValidationError, match="frozen"):
        c.tenant = "other"  # type: ignore[misc]
