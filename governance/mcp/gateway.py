"""What the MCP server asks of the deployment: publish a call, look at a task, who owns it, cancel.

:class:`CeleryGateway` does it with the governance layer's own pieces, blocking (the server
calls it from worker threads): the publisher (authorized, held or recorded, then published, as
``govctl submit`` does), the ledger, the held store, the reviewers' verified approvals and the
result backend. :class:`Gateway` is the protocol the server depends on, so the server can be
tested without Celery.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from governance.integration.approvals.reviewers import Reviewers
from governance.integration.headers import CONTEXT, read_context
from governance.integration.publisher import governance_context
from governance.integration.runtime import GovernanceRuntime
from governance.mcp.catalog import ToolEntry
from governance.mcp.status import (
    TaskView,
    error_text,
    held_text,
    waiting_text,
    where_text,
)
from governance.policy.context import ActionContext
from governance.policy.engine import Policy
from governance.store.held import HeldStatus, HeldStore, HeldTask

log = logging.getLogger("governance.mcp")


class CallRefused(Exception):
    """A call that cannot be published as given (arguments the task cannot take)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Gateway(Protocol):
    """The deployment, as the MCP server uses it (every method blocks)."""

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        ...

    def publish(
        self, entry: ToolEntry, ctx: ActionContext, arguments: dict[str, Any], task_id: str
    ) -> None:
        """Publish a call of ``entry`` for ``ctx`` as task ``task_id``. Raises ``ActionDenied``
        (nothing enqueued), :class:`CallRefused`, or ``StoreUnavailable``."""
        ...

    def view(self, tenant: str, task_id: str) -> TaskView:
        """Where task ``task_id`` of ``tenant`` is now."""
        ...

    def owner(self, tenant: str, task_id: str) -> tuple[str, str] | None:
        """The (tenant, agent) that published task ``task_id``, if ``tenant`` has it."""
        ...

    def cancel(self, tenant: str, task_id: str, *, terminate: bool) -> str:
        """Revoke the task if it has not started (or, with ``terminate``, stop it); says what
        was done."""
        ...


class CeleryGateway:
    """The :class:`Gateway` of a governed Celery app."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.held_store = HeldStore(runtime.state)
        self.reviewers = Reviewers(app, runtime)

    @property
    def policy(self) -> Policy:
        return self.runtime.policy

    def publish(
        self, entry: ToolEntry, ctx: ActionContext, arguments: dict[str, Any], task_id: str
    ) -> None:
        task = self.app.tasks[entry.task_name]
        try:
            with governance_context(ctx):
                task.apply_async((), dict(arguments), task_id=task_id)
        except TypeError as exc:  # Celery's own check of the call against the function
            raise CallRefused(f"invalid arguments for tool {entry.name!r}: {exc}") from None

    # -- looking at a task ---------------------------------------------------------------------

    def view(self, tenant: str, task_id: str) -> TaskView:
        backend = self.app.backend
        meta = backend.get_task_meta(task_id)
        state = str(meta.get("status") or "PENDING")
        if state == "SUCCESS":
            return TaskView(task_id, state, "done", "done", result=meta.get("result"))
        if state in ("FAILURE", "REVOKED"):
            raw = meta.get("result")
            try:
                failure = backend.exception_to_python(raw) if state == "FAILURE" else raw
            except Exception:  # an exception class this process cannot rebuild
                failure = raw
            error = error_text(failure) if state == "FAILURE" else "revoked before it ran"
            return TaskView(task_id, state, "done", "done", error=error)
        where = self.runtime.ledger.where(tenant, task_id).get("where", "")
        if state == "HELD" or where == "held":
            held = self.held_store.get(tenant, task_id)
            if held is not None:
                return self._held_view(held, state, where)
        if state == "DEFERRED" and where in ("waiting", "queued", "parked", ""):
            info = meta.get("result")
            if isinstance(info, dict):
                message = waiting_text(info, now_ms=int(time.time() * 1000))
                detail = {
                    k: info[k] for k in ("violation", "reason", "ahead", "turn_ms") if k in info
                }
                return TaskView(task_id, state, where, message, detail=detail)
        return TaskView(task_id, state, where, where_text(where, state))

    def _held_view(self, held: HeldTask, state: str, where: str) -> TaskView:
        if held.status is not HeldStatus.HELD:
            said = {
                HeldStatus.RELEASED: "approved: queued to run",
                HeldStatus.REJECTED: "rejected by a reviewer: finishing",
                HeldStatus.EXPIRED: "expired before reviewers decided: finishing",
                HeldStatus.SUGGESTED: "filed as a suggestion",
            }[held.status]
            return TaskView(held.task_id, state, where, said)
        tenant = self.runtime.policy.tenant(held.tenant)
        quorum = tenant.approval.quorum if tenant is not None else 1
        approvals = self._approvals(held)
        return TaskView(
            held.task_id,
            "HELD",
            where or "held",
            held_text(approvals, quorum, held.kind),
            held=True,
            detail={"approvals": approvals, "quorum": quorum, "kind": held.kind},
        )

    def _approvals(self, held: HeldTask) -> int:
        """Verified approvals (signatures checked against the policy's keys); the stored count
        when they cannot be checked here."""
        signed = held.signed_approvals()
        if not signed:
            return 0
        try:
            found = self.reviewers.find_call(held.task_id)
            return len(self.reviewers.verified_approvals(found, signed))
        except Exception as exc:
            log.debug("approvals of %s not verified (%s): stored count", held.task_id, exc)
            return held.approvals

    def owner(self, tenant: str, task_id: str) -> tuple[str, str] | None:
        held = self.held_store.get(tenant, task_id)
        if held is not None:
            return held.tenant, held.agent
        raw = self.runtime.ledger.where(tenant, task_id).get("msg")
        if not raw:
            return None
        try:
            headers = json.loads(raw).get("options", {}).get("headers") or {}
            ctx = read_context(headers[CONTEXT])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return ctx.tenant, ctx.agent

    def cancel(self, tenant: str, task_id: str, *, terminate: bool) -> str:
        view = self.view(tenant, task_id)
        if view.done:
            return f"task {task_id} already ended ({view.state}): nothing to cancel"
        control = self.app.control
        if not view.started:
            control.revoke(task_id)
            note = (
                " (reviewers still list it as held; if they approve it, it is dropped unrun)"
                if view.held
                else ""
            )
            return f"task {task_id} revoked before it ran{note}"
        if terminate:
            control.revoke(task_id, terminate=True, signal="SIGTERM")
            return f"task {task_id} was running: revoked and terminated"
        return (
            f"task {task_id} is already running: it is not stopped and runs to its end "
            "(fetch its result with governance_result)"
        )
