"""The MCP server of a governed deployment: ``tools/list`` and ``tools/call``, governed.

Built on the official SDK's low-level :class:`mcp.server.lowlevel.Server` (both protocol eras:
the 2025 handshake and 2026-07-28's self-contained requests), over stdio or streamable HTTP
(:mod:`governance.mcp.serve`). Each request is made by a :class:`Caller`: a tenant, an agent,
a user, and the connection's run (fixed on stdio's command line, the MCP session on HTTP).

- ``tools/list``: the tools this agent of this tenant may call (:class:`~governance.mcp.catalog.
  Catalog`), plus ``governance_result`` and ``governance_cancel``.
- ``tools/call``: the task is published in the caller's context, through the governance
  publisher. A denial is a tool error with the policy's reason, at once. Otherwise the call
  waits for the task, sending progress notifications whenever what it waits for changes
  ("waiting: concurrency 3/3, 2 ahead", "held: 1 of 2 approvals"), and answers with its result;
  after ``call_timeout_s`` (or ``_meta["governance/wait_s"]``) it answers instead with where the
  task is and how to follow it. The task goes on regardless.
- The first progress notification names the task id; the answers carry it in ``_meta``
  (``governance/task_id``). ``governance_result`` fetches a task's result by id (waiting as a
  call does; cancelling it only stops the waiting), ``governance_cancel`` cancels it: only for
  the tenant and agent that called it.
  ``_meta["governance/call_key"]`` makes a call idempotent: the same key (same tenant and agent)
  names the same task, so a client that lost its connection calls again and follows the task it
  started instead of starting another (or asks ``governance_result`` by ``call_key``).
- Cancelling a ``tools/call`` (``notifications/cancelled``, or closing the response stream of a
  2026-07-28 HTTP request) revokes its task if it has not started; a started task is stopped
  only with ``cancel_running = terminate``. A server that shuts down cancels nothing.

The SDK (``mcp`` 2.0 to 2.3) has no MCP Tasks (``tasks/*`` are absent from its method
tables), hence the ``governance_result`` tool.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from governance.integration.errors import ActionDenied
from governance.mcp.catalog import CANCEL_TOOL, RESULT_TOOL, Catalog, Listed
from governance.mcp.gateway import CallRefused, Gateway
from governance.mcp.settings import CancelRunning, McpSettings
from governance.mcp.status import TaskView
from governance.policy.context import ActionContext, validate_identifier
from governance.store.errors import StoreUnavailable

log = logging.getLogger("governance.mcp")

#: ``_meta`` keys a client may send with ``tools/call``.
META_RUN = "governance/run"
META_CALL_KEY = "governance/call_key"
META_WAIT = "governance/wait_s"
#: ``_meta`` keys of the answers.
META_TASK_ID = "governance/task_id"
META_STATE = "governance/state"
META_TIER = "governance/tier"

#: Call keys name task ids in this namespace, per tenant and agent.
CALL_KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "celery-governance/mcp/call-key")

INSTRUCTIONS = (
    "The tools of a governed deployment. Every call is authorized by the deployment's policy "
    "and may wait: for capacity (its tenant's limits), or for human reviewers (an approval "
    "tier). A denied call answers with the policy's reason. A call that is not done in time "
    "answers with its task id: fetch the result later with governance_result, or cancel it "
    "with governance_cancel."
)


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the governance context of the connection (the run aside when
    None: then each call is a run of its own, unless ``_meta`` names one)."""

    tenant: str
    agent: str
    user: str | None = None
    run: str | None = None


CallerOf = Callable[[ServerRequestContext[Any, Any]], Caller]


def call_key_task_id(tenant: str, agent: str, key: str) -> str:
    """The task id a call key names for one agent of one tenant."""
    return str(uuid.uuid5(CALL_KEY_NAMESPACE, f"{tenant}\n{agent}\n{key}"))


def _text(text: str) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=text)]


def tool_error(text: str, **meta: Any) -> types.CallToolResult:
    return types.CallToolResult(content=_text(text), is_error=True, _meta=meta or None)


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, default=str)


def done_answer(view: TaskView) -> types.CallToolResult:
    """A task that ended, as the answer to its call."""
    meta = {META_TASK_ID: view.task_id, META_STATE: view.state}
    if view.state != "SUCCESS":
        what = view.error or view.state.lower()
        return tool_error(f"task {view.task_id} ended {view.state}: {what}", **meta)
    result = view.result
    text = _json(result)
    governance = result.get("governance") if isinstance(result, dict) else None
    if governance in ("shadowed", "suggested"):
        text = f"{governance}: the call was recorded, not run\n{text}"
    return types.CallToolResult(
        content=_text(text),
        structured_content=result if isinstance(result, dict) else None,
        _meta=meta,
    )


def pending_answer(view: TaskView, waited_s: float) -> types.CallToolResult:
    """A task not done in time: where it is, and how to follow it."""
    follow = [
        f"governance_result with task_id {view.task_id} (waits for it, or answers at once "
        "with wait_s 0)",
        f"governance_cancel with task_id {view.task_id}",
    ]
    text = (
        f"task {view.task_id} is not done after {waited_s:g} s: {view.message or view.state}. "
        "It goes on without this call: fetch its result with the tool governance_result "
        f"(task_id {view.task_id}), or cancel it with governance_cancel."
    )
    if view.held:
        text += (
            f" Reviewers decide it with govctl: `govctl held show {view.task_id}`, "
            f"`govctl held approve {view.task_id} --key PATH`."
        )
        follow.append(f"govctl held show {view.task_id}")
    structured = {
        "task_id": view.task_id,
        "done": False,
        "state": view.state,
        "where": view.where,
        "status": view.message,
        **dict(view.detail),
        "follow": follow,
    }
    return types.CallToolResult(
        content=_text(text),
        structured_content=structured,
        _meta={META_TASK_ID: view.task_id, META_STATE: view.state},
    )


_TASK_ID_PROPERTY = {
    "type": "string",
    "description": "The task id a call answered with (or named in its first progress message).",
}


def result_tool(default_wait_s: float) -> types.Tool:
    return types.Tool(
        name=RESULT_TOOL,
        description=(
            "Fetch the result of a task this agent started (a call that answered before its "
            "task was done, or whose connection was lost), by its task id or by the call_key "
            "the call was made with. Waits for it like a call does, up to wait_s."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "task_id": _TASK_ID_PROPERTY,
                "call_key": {
                    "type": "string",
                    "description": "The _meta governance/call_key the call was made with.",
                },
                "wait_s": {
                    "type": "number",
                    "minimum": 0,
                    "description": f"How long to wait for it (default {default_wait_s:g}; 0: "
                    "answer at once).",
                },
            },
            "additionalProperties": False,
        },
    )


def cancel_tool() -> types.Tool:
    return types.Tool(
        name=CANCEL_TOOL,
        description=(
            "Cancel a task this agent started: it is revoked if it has not started yet; a "
            "running task is not stopped unless the deployment says so."
        ),
        input_schema={
            "type": "object",
            "properties": {"task_id": _TASK_ID_PROPERTY},
            "required": ["task_id"],
            "additionalProperties": False,
        },
    )


def mcp_tool(listed: Listed) -> types.Tool:
    return types.Tool(
        name=listed.entry.name,
        description=listed.description(),
        input_schema=listed.entry.input_schema,
        _meta={META_TIER: listed.tier},
    )


class GovernedMcpServer:
    """The MCP server for one deployment (see the module doc)."""

    def __init__(
        self,
        gateway: Gateway,
        catalog: Catalog,
        settings: McpSettings,
        caller_of: CallerOf,
        *,
        closing: Callable[[], bool] = lambda: False,
        name: str = "celery-governance",
        version: str = "",
    ) -> None:
        self.gateway = gateway
        self.catalog = catalog
        self.settings = settings
        self.caller_of = caller_of
        self.closing = closing
        self.server: Server[Any] = Server(
            name,
            version=version,
            instructions=INSTRUCTIONS,
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
        )

    # -- tools/list ----------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        caller = self.caller_of(ctx)
        listed = await anyio.to_thread.run_sync(
            self.catalog.listed, self.gateway.policy, caller.tenant, caller.agent, caller.user
        )
        tools = [mcp_tool(item) for item in listed]
        tools += [result_tool(self.settings.call_timeout_s), cancel_tool()]
        return types.ListToolsResult(tools=tools)

    # -- tools/call ----------------------------------------------------------------------------

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        caller = self.caller_of(ctx)
        arguments = dict(params.arguments or {})
        if params.name == RESULT_TOOL:
            return await self._result(ctx, caller, arguments)
        if params.name == CANCEL_TOOL:
            return await self._cancel(caller, arguments)
        entry = self.catalog.tool(params.name)
        if entry is None:
            offered = ", ".join([*sorted(self.catalog.entries), RESULT_TOOL, CANCEL_TOOL])
            raise MCPError(
                code=types.INVALID_PARAMS,
                message=f"unknown tool {params.name!r} (this server offers: {offered})",
            )
        meta: Mapping[str, Any] = dict(ctx.meta or {})
        try:
            wait_s = self._wait_s(meta.get(META_WAIT))
            key = meta.get(META_CALL_KEY)
            if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
                raise ValueError(f"_meta {META_CALL_KEY} must be a string of 1 to 256 characters")
            task_id = (
                call_key_task_id(caller.tenant, caller.agent, key) if key else str(uuid.uuid4())
            )
            run = self._run(caller, meta.get(META_RUN), task_id)
        except ValueError as exc:
            return tool_error(str(exc))
        if key:
            owner = await anyio.to_thread.run_sync(self.gateway.owner, caller.tenant, task_id)
            if owner == (caller.tenant, caller.agent):  # the same call again: follow its task
                return await self._follow(ctx, caller.tenant, task_id, wait_s, "already started")
            if owner is not None:
                return tool_error(f"_meta {META_CALL_KEY}: the key names another agent's task")
        context = ActionContext(tenant=caller.tenant, agent=caller.agent, run=run, user=caller.user)
        try:
            await anyio.to_thread.run_sync(self.gateway.publish, entry, context, arguments, task_id)
        except ActionDenied as exc:
            return tool_error(f"denied: {exc.reason}", **{META_TASK_ID: task_id})
        except CallRefused as exc:
            return tool_error(exc.reason)
        except StoreUnavailable as exc:
            return tool_error(
                f"the governance state store is unavailable, nothing was enqueued: {exc}"
            )
        except Exception as exc:
            log.exception("publishing a call of %s failed", entry.name)
            return tool_error(f"the call could not be published ({type(exc).__name__}: {exc})")
        return await self._follow(ctx, caller.tenant, task_id, wait_s, "published")

    def _wait_s(self, raw: Any) -> float:
        if raw is None:
            return self.settings.call_timeout_s
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError(f"_meta {META_WAIT} must be a number of seconds")
        return min(max(float(raw), 0.0), self.settings.max_wait_s)

    @staticmethod
    def _run(caller: Caller, raw: Any, task_id: str) -> str:
        if raw is not None:
            if not isinstance(raw, str):
                raise ValueError(f"_meta {META_RUN} must be a string")
            try:
                return validate_identifier(raw)
            except ValueError as exc:
                raise ValueError(f"_meta {META_RUN}: {exc}") from None
        return caller.run or f"mcp-{task_id}"

    # -- following a task ----------------------------------------------------------------------

    async def _follow(
        self,
        ctx: ServerRequestContext[Any, Any],
        tenant: str,
        task_id: str,
        wait_s: float,
        opening: str,
        *,
        revoke_on_cancel: bool = True,
    ) -> types.CallToolResult:
        """Wait for the task up to ``wait_s``, reporting progress; answer with its result, or
        with where it is. The client cancelling a call (``revoke_on_cancel``; not a
        ``governance_result``, which only stops waiting) revokes a task that has not started."""
        step = 0

        async def report(message: str) -> None:
            nonlocal step
            step += 1
            try:
                await ctx.session.report_progress(step, None, message)
            except Exception as exc:  # progress is advice: a lost stream must not end the call
                log.debug("progress of task %s not sent: %s", task_id, exc)

        started = anyio.current_time()
        delay = min(0.05, self.settings.poll_s)
        last = ""
        view = TaskView(task_id, "PENDING", message=opening)
        try:
            await report(f"task {task_id}: {opening}")
            while True:
                try:
                    view = await anyio.to_thread.run_sync(self.gateway.view, tenant, task_id)
                except Exception as exc:  # an outage: say so, and look again
                    log.warning("task %s: cannot read where it is: %s", task_id, exc)
                    problem = "state store" if isinstance(exc, StoreUnavailable) else "results"
                    view = TaskView(
                        task_id, view.state, view.where, f"{problem} unavailable, retrying: {exc}"
                    )
                if view.done:
                    return done_answer(view)
                if view.message and view.message != last:
                    last = view.message
                    await report(view.message)
                remaining = started + wait_s - anyio.current_time()
                if remaining <= 0:
                    return pending_answer(view, wait_s)
                await anyio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, self.settings.poll_s)
        except anyio.get_cancelled_exc_class():
            if revoke_on_cancel and self._cancelled_by_client(ctx):
                with anyio.CancelScope(shield=True):
                    await self._revoke_on_cancel(tenant, task_id)
            raise

    def _cancelled_by_client(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether the client cancelled the request (not the server shutting down, nor a lost
        connection): a ``notifications/cancelled``, or, for a 2026-07-28 request over HTTP,
        closing its response stream (how that protocol cancels)."""
        # The request's dispatch context records a peer's cancellation; the SDK does not
        # expose it on the low-level context (only on its unused high-level Context).
        dispatch = getattr(ctx.session, "_request_outbound", None)
        event = getattr(dispatch, "cancel_requested", None)
        if isinstance(event, anyio.Event) and event.is_set():
            return True
        if self.closing():
            return False
        return ctx.request is not None and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS

    async def _revoke_on_cancel(self, tenant: str, task_id: str) -> None:
        terminate = self.settings.cancel_running is CancelRunning.TERMINATE
        try:
            outcome = await anyio.to_thread.run_sync(
                lambda: self.gateway.cancel(tenant, task_id, terminate=terminate)
            )
            log.info("the client cancelled its call: %s", outcome)
        except Exception as exc:
            log.warning("the client cancelled its call of task %s: not revoked (%s)", task_id, exc)

    # -- governance_result, governance_cancel --------------------------------------------------

    async def _owned_task(self, caller: Caller, arguments: Mapping[str, Any]) -> str:
        task_id = arguments.get("task_id")
        key = arguments.get("call_key")
        if key is not None:
            if not isinstance(key, str) or not key:
                raise ValueError("call_key must be a non-empty string")
            task_id = call_key_task_id(caller.tenant, caller.agent, key)
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("give the task_id (or the call_key) of the call")
        try:
            validate_identifier(task_id)
        except ValueError as exc:
            raise ValueError(f"task_id: {exc}") from None
        owner = await anyio.to_thread.run_sync(self.gateway.owner, caller.tenant, task_id)
        if owner != (caller.tenant, caller.agent):
            # The same answer whether it does not exist or belongs to someone else.
            raise ValueError(
                f"no task {task_id} of agent {caller.agent!r} of tenant {caller.tenant!r}"
            )
        return task_id

    async def _result(
        self, ctx: ServerRequestContext[Any, Any], caller: Caller, arguments: Mapping[str, Any]
    ) -> types.CallToolResult:
        try:
            task_id = await self._owned_task(caller, arguments)
            wait_s = self._wait_s(arguments.get("wait_s"))
        except ValueError as exc:
            return tool_error(str(exc))
        return await self._follow(
            ctx, caller.tenant, task_id, wait_s, "following", revoke_on_cancel=False
        )

    async def _cancel(self, caller: Caller, arguments: Mapping[str, Any]) -> types.CallToolResult:
        try:
            task_id = await self._owned_task(caller, arguments)
        except ValueError as exc:
            return tool_error(str(exc))
        terminate = self.settings.cancel_running is CancelRunning.TERMINATE
        outcome = await anyio.to_thread.run_sync(
            lambda: self.gateway.cancel(caller.tenant, task_id, terminate=terminate)
        )
        return types.CallToolResult(content=_text(outcome), _meta={META_TASK_ID: task_id})
