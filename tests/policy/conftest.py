"""Shared fixtures of the policy tests: a small config to vary, and contexts and actions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governance.policy import ActionContext, LLMCall, Message, Policy, ToolCall

HERE = Path(__file__).parent

#: Public keys of two reviewers (their private halves are not needed by these tests).
ALICE_KEY = "ed25519:cltQnXGlBciOuro1ZeJEnJERxa9NxzwqpBKj7ZGAGl0="
BOB_KEY = "ed25519:gf0EDAKHftlxpVZdX0TRNiBr1auhV9OOFolgljrsizA="

BASE_CONFIG: dict[str, Any] = {
    "version": 1,
    "tools": {
        "echo": "compute",
        "http_get": "network.read",
        "read_file": "fs.read",
        "write_file": "fs.write",
        "delete_file": "fs.delete",
        "shell": "process.exec",
    },
    "providers": {
        "fake": {
            "models": {"fake-small": {"input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5}},
        },
        "openai": {
            "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}},
            "default_price": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
        },
    },
    "defaults": {},
    "tenants": {
        "acme": {
            "allowed_tools": ["echo", "http_get", "read_file", "write_file", "shell"],
            "allowed_providers": ["fake", "openai"],
        },
    },
}


@pytest.fixture
def base_config() -> dict[str, Any]:
    """A fresh deep copy of BASE_CONFIG, free to modify."""
    return copy.deepcopy(BASE_CONFIG)


@pytest.fixture
def make_policy(base_config: dict[str, Any]) -> Callable[..., Policy]:
    """Build a Policy from BASE_CONFIG with `defaults` and `acme` settings updated."""

    def make(acme: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> Policy:
        data = copy.deepcopy(base_config)
        data["tenants"]["acme"].update(acme or {})
        data["defaults"].update(defaults or {})
        return Policy.from_dict(data)

    return make


@pytest.fixture
def ctx() -> Callable[..., ActionContext]:
    """An ActionContext of tenant acme, run r1, for the given agent, requested by carol."""

    def make(agent: str = "bot", tenant: str = "acme", user: str | None = "carol") -> ActionContext:
        return ActionContext(tenant=tenant, agent=agent, run="r1", user=user)

    return make


def tool(name: str, **input: Any) -> ToolCall:
    return ToolCall(tool=name, input=input)


def llm(provider: str = "fake", model: str = "fake-small", max_tokens: int = 100) -> LLMCall:
    return LLMCall(
        provider=provider,
        model=model,
        messages=[Message(role="user", content="hello")],
        max_tokens=max_tokens,
    )


@pytest.fixture
def tool_call() -> Callable[..., ToolCall]:
    return tool


@pytest.fixture
def llm_call() -> Callable[..., LLMCall]:
    return llm


@pytest.fixture
def sample_hooks(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The policy_sample_hooks module (importable as such), with its call log cleared."""
    monkeypatch.syspath_prepend(str(HERE))
    import policy_sample_hooks

    policy_sample_hooks.CALLS.clear()
    return policy_sample_hooks
