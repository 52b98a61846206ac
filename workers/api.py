"""The publisher API of the example deployment: enqueue a tool call or an LLM call for a context.

Both authorize first (a denial raises :class:`governance.integration.ActionDenied` and nothing is
enqueued) and return the Celery ``AsyncResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from governance.integration import ActionDenied, submit
from governance.policy.actions import Message
from governance.policy.context import ActionContext
from workers.llm import LLM_TASK_NAME
from workers.tasks import TOOL_TASK_PREFIX


def submit_tool(app: Celery, ctx: ActionContext, tool: str, **tool_input: Any) -> Any:
    """Enqueue ``tool`` with ``tool_input`` for ``ctx``."""
    task = app.tasks.get(TOOL_TASK_PREFIX + tool)
    if task is None:
        raise ActionDenied(f"unknown tool {tool!r}: no task {TOOL_TASK_PREFIX}{tool} is registered")
    return submit(task, ctx, **tool_input)


def submit_llm(
    app: Celery,
    ctx: ActionContext,
    *,
    provider: str,
    model: str,
    messages: Sequence[Message | dict[str, str]],
    max_tokens: int,
) -> Any:
    """Enqueue one LLM call for ``ctx``."""
    wire = [m.model_dump() if isinstance(m, Message) else dict(m) for m in messages]
    return submit(
        app.tasks[LLM_TASK_NAME],
        ctx,
        provider=provider,
        model=model,
        messages=wire,
        max_tokens=max_tokens,
    )
