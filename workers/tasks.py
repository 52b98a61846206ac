"""The tools as governed Celery tasks: ``tools.<name>``, taking the tool's input as kwargs.

Each task's action is ``ToolCall(tool=<name>, input=kwargs)``; its input is validated against
the tool's pydantic model and the tenant's policy (workspace, allowed domains and networks) before
admission, so an invalid input is a denial and the tool never runs.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from governance.integration import ActionDenied, GovernedTask, current_execution, runtime_for
from governance.policy.actions import Action, ToolCall
from governance.policy.errors import ActionError
from governance.policy.tenant import TenantPolicy
from governance.settings import GovernanceSettings
from workers.tools import TOOLS, InputRejected, ToolEnv, ToolSpec, validate_input

TOOL_TASK_PREFIX = "tools."


class ToolTask(GovernedTask):
    """A governed task running one tool."""

    spec: ToolSpec[Any]
    settings: GovernanceSettings

    def build_action(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        if args:
            raise ActionDenied(f"tool {self.spec.name!r} takes keyword arguments only")
        return ToolCall(tool=self.spec.name, input=kwargs)

    def env(self, tenant: TenantPolicy) -> ToolEnv:
        return ToolEnv(
            workspace=self.settings.workspace_dir,
            allowed_domains=tenant.allowed_domains,
            allowed_networks=tenant.allowed_networks,
            http_timeout_s=self.settings.http_timeout_s,
            shell_user=self.settings.shell_user,
            shell_isolate_network=self.settings.shell_isolate_network,
            shell_best_effort=self.settings.shell_best_effort,
        )

    def prepare(self, action: Action, tenant: TenantPolicy) -> None:
        assert isinstance(action, ToolCall)
        try:
            validate_input(self.spec, action.input, self.env(tenant))
        except InputRejected as exc:
            raise ActionDenied(exc.reason) from None

    def run_tool(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        execution = current_execution()
        assert execution is not None, "tool bodies run inside a governed execution"
        tenant = runtime_for(self.app).policy.tenant(execution.context.tenant)
        assert tenant is not None
        env = self.env(tenant)
        try:
            # Checked before admission, but the world may have changed (a name may resolve to
            # another address now); the run checks again what it actually uses.
            return self.spec.run(validate_input(self.spec, kwargs, env), env)
        except InputRejected as exc:
            raise ActionError.permanent(exc.reason) from None


def register_tool_tasks(app: Celery, settings: GovernanceSettings) -> dict[str, ToolTask]:
    """Register ``tools.<name>`` on ``app`` for every tool; returns them by tool name."""
    settings.workspace_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, ToolTask] = {}
    for name, spec in TOOLS.items():

        def body(self: ToolTask, **kwargs: Any) -> dict[str, Any]:
            return self.run_tool(kwargs)

        tasks[name] = app.task(
            body,
            name=TOOL_TASK_PREFIX + name,
            base=ToolTask,
            bind=True,
            shared=False,
            spec=spec,
            governance_tool=name,
            settings=settings,
        )
    return tasks
