"""The tools an MCP client sees: the governed tool tasks, as the policy lets an agent see them.

Every governed task of the app that is a tool (not an LLM task) is a candidate, named after its
tool in the policy (``task.tool_name``). Its input schema comes, first found:

1. from the task itself: an ``mcp_input_schema`` attribute (a JSON Schema object);
2. from a pydantic input model: ``task.input_model``, or ``task.spec.input_model`` (the example
   deployment's tools carry their spec);
3. from the signature of the task's function: one property per parameter, typed from its
   annotation (``**kwargs`` allows any other property; a required positional-only parameter
   cannot be passed by name, so such a task is not offered).

``tools/list`` for one agent of one tenant asks the policy, without running hooks, what would
happen to a call of each tool: a tool the policy denies outright (not in the allow-list, a deny
rule, an approval tier without a requester) is not listed; the others are, with their tier in
the description. Hooks decide per call, with the call's input, when it is published (a hook
never hides a tool). The listing follows the policy in force (a reloaded file changes it).
"""

from __future__ import annotations

import inspect
import logging
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from governance.integration.governed import is_governed
from governance.integration.worker.task import GovernedLLMTask
from governance.policy.actions import ToolCall
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.engine import Policy
from governance.policy.tiers import Outcome, Tier

log = logging.getLogger("governance.mcp")

#: The tool that fetches a task's result by id (MCP Tasks' stand-in; see docs/mcp.md).
RESULT_TOOL = "governance_result"
#: The tool that cancels a task by id.
CANCEL_TOOL = "governance_cancel"
RESERVED = frozenset({RESULT_TOOL, CANCEL_TOOL})

#: SEP-986: what an MCP tool name may be.
TOOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")

TIER_WORDS = {
    Tier.act_auto: "runs at once",
    Tier.act_with_approval: "held until the tenant's reviewers approve it; the call waits "
    "for them (or answers with the task id to follow)",
    Tier.suggest: "filed as a suggestion for reviewers, never run",
    Tier.shadow: "recorded in shadow mode, never run",
}


@dataclass(frozen=True)
class ToolEntry:
    """One governed tool task as MCP shows it."""

    name: str
    task_name: str
    input_schema: dict[str, Any]
    description: str
    #: The task itself (a Celery task object); not compared.
    task: Any = field(compare=False, repr=False, default=None)


@dataclass(frozen=True)
class Listed:
    """A tool as one agent of one tenant sees it: the entry and the policy's decision."""

    entry: ToolEntry
    decision: Decision

    @property
    def tier(self) -> str:
        return self.decision.tier.value if self.decision.tier else ""

    def description(self) -> str:
        tier = self.decision.tier
        words = TIER_WORDS.get(tier, "") if tier is not None else ""
        note = f"Governed: tier {tier.value}, {words}." if tier is not None else "Governed."
        if self.decision.granted:
            note = "Governed: allowed by a grant, runs at once."
        return f"{self.entry.description}\n\n{note}".strip()


def _first_line(text: str | None) -> str:
    return (inspect.cleandoc(text).split("\n\n", 1)[0].replace("\n", " ") if text else "").strip()


def _model_of(task: Any) -> type[BaseModel] | None:
    for holder in (task, getattr(task, "spec", None)):
        model = getattr(holder, "input_model", None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model
    return None


def _signature_of(task: Any) -> inspect.Signature | None:
    run = getattr(task, "run", None)
    if run is None:
        return None
    try:
        return inspect.signature(run)
    except (TypeError, ValueError):
        return None


def _hints(task: Any) -> dict[str, Any]:
    run = getattr(task, "run", None)
    target = getattr(run, "__func__", run)
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: no types, not no tool
        return {}


def schema_from_signature(task: Any) -> dict[str, Any] | None:
    """A JSON Schema of the task function's keyword arguments, or None when a required
    argument cannot be passed by name (positional-only)."""
    signature = _signature_of(task)
    if signature is None:
        return {"type": "object", "additionalProperties": True}
    hints = _hints(task)
    fields: dict[str, Any] = {}
    extra = False
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            extra = True
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            if param.default is param.empty:
                return None
            continue
        annotation = hints.get(name, Any)
        default = ... if param.default is param.empty else param.default
        fields[name] = (annotation, default)
    try:
        model = create_model(
            "Input",
            __config__=ConfigDict(extra="allow" if extra else "forbid"),
            **fields,
        )
        schema: dict[str, Any] = model.model_json_schema()
    except Exception:  # a type pydantic cannot describe: any value of those names
        schema = {
            "type": "object",
            "properties": {name: {} for name in fields},
            "required": [n for n, (_, d) in fields.items() if d is ...],
        }
        if not extra:
            schema["additionalProperties"] = False
    schema.pop("title", None)
    return schema


def input_schema(task: Any) -> dict[str, Any] | None:
    """The input schema of a governed task (see the module doc); None: not callable by MCP."""
    declared = getattr(task, "mcp_input_schema", None)
    if isinstance(declared, Mapping):
        return dict(declared)
    model = _model_of(task)
    if model is not None:
        schema = model.model_json_schema()
        schema.pop("title", None)
        return schema
    return schema_from_signature(task)


def _description(task: Any, tool: str, policy: Policy) -> str:
    spec = policy.config.tools.get(tool)
    if spec is not None and spec.description:
        return spec.description
    described = getattr(getattr(task, "spec", None), "description", None)
    if isinstance(described, str) and described:
        return described
    return _first_line(getattr(task, "__doc__", None)) or f"The governed task {task.name}."


def tool_entries(app: Any, policy: Policy) -> dict[str, ToolEntry]:
    """Every governed tool task of ``app`` that MCP can offer, by tool name."""
    entries: dict[str, ToolEntry] = {}
    for task_name in sorted(app.tasks):
        task = app.tasks[task_name]
        if not is_governed(task) or isinstance(task, GovernedLLMTask):
            continue
        name = str(task.tool_name)
        if TOOL_NAME.fullmatch(name) is None or name in RESERVED:
            log.warning("task %s: tool name %r cannot be an MCP tool; not offered", task_name, name)
            continue
        if name in entries:
            log.warning(
                "tasks %s and %s are both tool %r; MCP offers %s",
                entries[name].task_name,
                task_name,
                name,
                entries[name].task_name,
            )
            continue
        schema = input_schema(task)
        if schema is None:
            log.warning(
                "task %s takes a positional-only argument: MCP passes arguments by name; "
                "not offered",
                task_name,
            )
            continue
        schema.setdefault("type", "object")
        entries[name] = ToolEntry(
            name=name,
            task_name=task_name,
            input_schema=schema,
            description=_description(task, name, policy),
            task=task,
        )
    return entries


def _allow(_ctx: Any, _action: Any) -> None:
    return None


class Catalog:
    """The app's tools, and what one agent of one tenant may see of them."""

    def __init__(self, app: Any, policy: Policy) -> None:
        self.app = app
        self._entries = tool_entries(app, policy)
        self._unhooked: tuple[Policy, Policy] | None = None

    @property
    def entries(self) -> Mapping[str, ToolEntry]:
        return self._entries

    def tool(self, name: str) -> ToolEntry | None:
        return self._entries.get(name)

    def _without_hooks(self, policy: Policy) -> Policy:
        """The same policy with every hook allowing: what is denied outright."""
        cached = self._unhooked
        if cached is None or cached[0] is not policy:
            twin = Policy(policy.config, source=policy.source, hook_loader=lambda _spec: _allow)
            self._unhooked = cached = (policy, twin)
        return cached[1]

    def decide(self, policy: Policy, ctx: ActionContext, name: str) -> Decision:
        """What the policy, without its hooks, says of a call of tool ``name`` by ``ctx``."""
        return self._without_hooks(policy).authorize(ctx, ToolCall(tool=name, input={}))

    def listed(self, policy: Policy, tenant: str, agent: str, user: str | None) -> list[Listed]:
        """The tools ``agent`` of ``tenant`` (acting for ``user``) may call, in name order."""
        ctx = ActionContext(tenant=tenant, agent=agent, run="mcp-list", user=user)
        shown = []
        for name in sorted(self._entries):
            decision = self.decide(policy, ctx, name)
            if decision.outcome is not Outcome.deny:
                shown.append(Listed(self._entries[name], decision))
        return shown


def names(listed: Iterable[Listed]) -> list[str]:
    return [item.entry.name for item in listed]
