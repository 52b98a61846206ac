"""Fixtures of the MCP server's unit tests: a policy, an app of fake governed tasks, a fake
gateway (no Celery, no Redis), and the server on the SDK's in-process client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from governance.integration.errors import ActionDenied
from governance.mcp.catalog import Catalog, ToolEntry
from governance.mcp.server import Caller, GovernedMcpServer
from governance.mcp.settings import McpSettings
from governance.mcp.status import TaskView
from governance.policy.actions import ToolCall
from governance.policy.context import ActionContext
from governance.policy.engine import Policy
from governance.policy.tiers import Outcome

POLICY = {
    "version": 1,
    "tools": {
        "echo": "compute",
        "add": "compute",
        "write_file": {"class": "fs.write", "description": "Write a file of the workspace."},
        "delete_file": "fs.delete",
        "shell": "process.exec",
        "slow": "compute",
    },
    "defaults": {"tiers": {"actions": {"process.exec": "act_with_approval"}}},
    "tenants": {
        "acme": {
            "allowed_tools": ["echo", "add", "write_file", "shell", "slow"],
            "deny": [{"agent": "intern-*", "action": "fs.*", "reason": "interns may not"}],
            "tiers": {"agents": {"watcher": "shadow"}},
            "hooks": ["tests.mcp.conftest:no_secrets"],
        },
        "beta": {"allowed_tools": ["echo"]},
    },
}


def no_secrets(ctx: ActionContext, action: Any) -> Any:
    """A hook: denies any call whose input mentions a secret (and so never hides a tool)."""
    from governance.policy.hooks import HookDecision

    if isinstance(action, ToolCall) and "secret" in str(action.input):
        return HookDecision.deny("no secrets, says the hook")
    return None


class FakeTask:
    """What the catalog reads of a governed Celery task."""

    governed = True

    def __init__(self, name: str, run: Callable[..., Any], tool: str | None = None) -> None:
        self.name = name
        self.run = run
        self.tool_name = tool or name
        self.__doc__ = run.__doc__


def _echo(text: str) -> dict[str, str]:
    """Return the text."""
    return {"text": text}


def _add(a: int, b: int = 2, *, label: str | None = None) -> int:
    """Add two numbers."""
    return a + b


def _anything(**kwargs: Any) -> Any:
    return kwargs


class FakeApp:
    def __init__(self, tasks: list[FakeTask]) -> None:
        self.tasks = {t.name: t for t in tasks}


def fake_app() -> FakeApp:
    return FakeApp(
        [
            FakeTask("tools.echo", _echo, "echo"),
            FakeTask("math.add", _add, "add"),
            FakeTask("tools.write_file", _anything, "write_file"),
            FakeTask("tools.delete_file", _anything, "delete_file"),
            FakeTask("tools.shell", _anything, "shell"),
            FakeTask("tools.slow", _anything, "slow"),
            FakeTask("celery.chord_unlock", _anything),
        ]
    )


@dataclass
class Published:
    entry: ToolEntry
    ctx: ActionContext
    arguments: dict[str, Any]
    views: list[TaskView]
    seen: int = 0


@dataclass
class FakeGateway:
    """Publishes by asking the policy; each task's views are scripted (the last repeats)."""

    policy: Policy
    script: Callable[[str, str, dict[str, Any]], list[TaskView]]
    published: dict[str, Published] = field(default_factory=dict)
    cancelled: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self, entry: ToolEntry, ctx: ActionContext, arguments: dict[str, Any], task_id: str
    ) -> None:
        decision = self.policy.authorize(ctx, ToolCall(tool=entry.name, input=arguments))
        if decision.outcome is Outcome.deny:
            raise ActionDenied(decision.reason)
        with self.lock:
            self.published[task_id] = Published(
                entry, ctx, arguments, self.script(task_id, entry.name, arguments)
            )

    def view(self, tenant: str, task_id: str) -> TaskView:
        with self.lock:
            task = self.published[task_id]
            view = task.views[min(task.seen, len(task.views) - 1)]
            task.seen += 1
            return view

    def owner(self, tenant: str, task_id: str) -> tuple[str, str] | None:
        task = self.published.get(task_id)
        if task is None or task.ctx.tenant != tenant:
            return None
        return task.ctx.tenant, task.ctx.agent

    def cancel(self, tenant: str, task_id: str, *, terminate: bool) -> str:
        self.cancelled.append((task_id, terminate))
        return f"task {task_id} revoked"


def default_script(task_id: str, tool: str, arguments: dict[str, Any]) -> list[TaskView]:
    if tool == "slow":
        return [
            TaskView(task_id, "DEFERRED", "waiting", "waiting: concurrency 3/3, 2 ahead"),
            TaskView(task_id, "DEFERRED", "waiting", "waiting: concurrency 3/3, 1 ahead"),
            TaskView(task_id, "STARTED", "running", "running"),
            TaskView(task_id, "SUCCESS", "done", "done", result={"slow": True}),
        ]
    if tool == "shell":  # held until the test says otherwise
        return [TaskView(task_id, "HELD", "held", "held: 0 of 2 approvals", held=True)]
    return [TaskView(task_id, "SUCCESS", "done", "done", result={"echo": arguments})]


@pytest.fixture
def policy() -> Policy:
    return Policy.from_dict(POLICY)


@pytest.fixture
def gateway(policy: Policy) -> FakeGateway:
    return FakeGateway(policy, default_script)


ServerFactory = Callable[..., GovernedMcpServer]


@pytest.fixture
def make_server(gateway: FakeGateway, policy: Policy) -> ServerFactory:
    def make(
        tenant: str = "acme",
        agent: str = "planner",
        user: str | None = "carol",
        run: str | None = "run-1",
        **settings: Any,
    ) -> GovernedMcpServer:
        caller = Caller(tenant=tenant, agent=agent, user=user, run=run)
        return GovernedMcpServer(
            gateway,
            Catalog(fake_app(), policy),
            McpSettings(**{"call_timeout_s": 5.0, "poll_s": 0.01, **settings}),
            lambda _ctx: caller,
        )

    return make
