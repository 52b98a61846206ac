"""Small builders shared by the store tests."""

from __future__ import annotations

import itertools
import json

from governance.policy.actions import LLMCall, Message, ToolCall
from governance.policy.context import ActionContext
from governance.policy.usage import Usage

_ids = itertools.count()


def ctx(tenant: str = "acme", run: str = "run-1", depth: int = 0) -> ActionContext:
    return ActionContext(tenant=tenant, agent="bot", run=run, discovery_depth=depth)


def tool(name: str = "echo", **payload: object) -> ToolCall:
    return ToolCall(tool=name, input=dict(payload) or {"n": next(_ids)})


def llm(provider: str = "fake", max_tokens: int = 100) -> LLMCall:
    return LLMCall(
        provider=provider,
        model="fake-small",
        messages=[Message(role="user", content=f"hello {next(_ids)}")],
        max_tokens=max_tokens,
    )


def tokens(n: int) -> Usage:
    """An estimate or actual usage of one LLM step with ``n`` output tokens."""
    return Usage(steps=1, output_tokens=n)


TOOL_STEP = Usage(steps=1, tool_calls=1)


def task_id() -> str:
    return f"task-{next(_ids)}"


def envelope(task: str) -> str:
    """The message of a task as a publisher records it in the ledger (what a hand-off sends)."""
    return json.dumps(
        {"task": "tools.echo", "args": [], "kwargs": {}, "options": {"task_id": task}}
    )
