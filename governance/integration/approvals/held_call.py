"""What a reviewer is shown, signs and releases comes from one object: the held message.

A held record keeps the call in several fields (the task name, arguments, context and action
shown to reviewers, the call hash they sign, the envelope a release publishes). Anyone who can
write the state Redis can edit them separately: show a benign call and release another. So the
reviewers' workflow derives all three from the envelope alone: the call hash is computed from it
(exactly as the worker computes it from the message it receives), the action is rebuilt from it
by the app's own task class, and what is shown is its arguments and context. A record whose
other fields disagree with its envelope is refused (:class:`HeldRecordTampered`) and audited,
never shown as if it were what would run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from governance.integration.errors import ApprovalRefused
from governance.integration.headers import (
    CONTEXT,
    HeaderError,
    context_dict,
    message_call,
    read_context,
)
from governance.integration.messages import Envelope
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.store.held import HeldTask


class HeldRecordTampered(ApprovalRefused):
    """A held record whose fields disagree with its message: edited in Redis."""


@dataclass(frozen=True)
class HeldCall:
    """A held task as its message says it: what a reviewer sees, signs and releases."""

    task: HeldTask
    envelope: Envelope
    context: ActionContext
    #: The call hash (task, arguments, context) a reviewer's signature covers.
    call: str
    #: The action the app's task class makes of the message (None when this process does not
    #: know the task: the arguments are shown instead).
    action: Action | None

    @property
    def shown_input(self) -> Any:
        """The call as a reviewer reads it: the action's input, else the arguments."""
        if self.action is not None:
            return self.action.model_dump(mode="json").get("input", self.envelope.kwargs)
        return {"args": self.envelope.args, "kwargs": self.envelope.kwargs}


def held_call(task: HeldTask, app: Any) -> HeldCall:
    """``task`` as its held message says it; :class:`HeldRecordTampered` naming every field of
    the record that disagrees with the message."""
    try:
        envelope = Envelope.from_dict(task.envelope)
        context = read_context(envelope.headers.get(CONTEXT))
    except (HeaderError, KeyError, TypeError, ValueError) as exc:
        raise HeldRecordTampered(
            f"held task {task.task_id}: its message cannot be read ({exc}); refused"
        ) from None
    call = message_call(envelope.task, envelope.args, envelope.kwargs, context)
    expected = {
        "task id": (task.task_id, envelope.options.get("task_id")),
        "task name": (task.task_name, envelope.task),
        "arguments": ((task.args, task.kwargs), (envelope.args, envelope.kwargs)),
        "context": (task.context, context_dict(context)),
        "tenant": (task.tenant, context.tenant),
        "agent": (task.agent, context.agent),
        "run": (task.run, context.run),
        "requester": (task.user, context.user or ""),
        "call hash": (task.call, call),
    }
    problems = [name for name, (stored, derived) in expected.items() if stored != derived]
    action = _action_of(app, envelope)
    if action is not None:
        if task.action != action.model_dump(mode="json"):
            problems.append("action")
        if task.action_name != action.name:
            problems.append("action name")
    if problems:
        raise HeldRecordTampered(
            f"held task {task.task_id}: its record disagrees with its message "
            f"({', '.join(problems)}): it was edited in the state Redis; refused"
        )
    return HeldCall(task, envelope, context, call, action)


def _action_of(app: Any, envelope: Envelope) -> Action | None:
    task = getattr(app, "tasks", {}).get(envelope.task)
    build = getattr(task, "action_for", None)
    if build is None:
        return None
    try:
        action: Action = build(tuple(envelope.args), dict(envelope.kwargs))
    except Exception:
        return None
    return action
