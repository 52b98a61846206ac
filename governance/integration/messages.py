"""A governed task's message as the ledger keeps it (an envelope), and publishing it again.

Whenever a task must travel again (handed on from the wait list, booked for a later turn, a
retry, a re-publication by the reconciler, a release by reviewers), it is published from its
envelope: the task name, its arguments and the Celery options that make it the same task (id,
chain and callbacks, group, parent and root, routing, time limits, headers). The envelope is
built with Celery's own ``signature_from_request`` (what ``Task.retry`` uses), so canvas keeps
working. Re-publications bypass the publisher's checks (they are not new work) and go straight
to the broker through the app's original ``send_task``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from celery._state import _task_stack

from governance.integration.headers import TRANSIENT

#: Options of ``send_task`` that an envelope keeps (None values are dropped).
KEPT_OPTIONS = (
    "task_id",
    "root_id",
    "parent_id",
    "group_id",
    "group_index",
    "chord",
    "chain",
    "link",
    "link_error",
    "expires",
    "soft_time_limit",
    "time_limit",
    "retries",
    "reply_to",
    "shadow",
    "priority",
    "queue",
    "exchange",
    "routing_key",
    "replaced_task_nesting",
    "ignore_result",
    "argsrepr",
    "kwargsrepr",
)

RawSend = Callable[..., Any]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Envelope:
    """Everything needed to publish a task again."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return str(self.options["task_id"])

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.options.get("headers") or {})

    def to_json(self) -> str:
        return json.dumps(
            {"task": self.task, "args": self.args, "kwargs": self.kwargs, "options": self.options},
            separators=(",", ":"),
            default=str,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Envelope:
        return cls(
            task=str(data["task"]),
            args=list(data.get("args") or []),
            kwargs=dict(data.get("kwargs") or {}),
            options=dict(data.get("options") or {}),
        )

    def with_retries(self, retries: int) -> Envelope:
        """The message of another attempt."""
        return replace(self, options={**self.options, "retries": retries})

    def with_headers(self, **headers: Any) -> Envelope:
        merged = {**self.headers, **headers}
        return replace(self, options={**self.options, "headers": merged})


def envelope_from_options(
    task: str, args: Any, kwargs: Any, options: Mapping[str, Any]
) -> Envelope:
    """The envelope of a message about to be sent with ``send_task(task, args, kwargs, **opts)``."""
    kept = {k: _plain(options[k]) for k in KEPT_OPTIONS if options.get(k) is not None}
    headers = {k: v for k, v in (options.get("headers") or {}).items() if k not in TRANSIENT}
    if headers:
        kept["headers"] = _plain(headers)
    return Envelope(task, list(args or ()), dict(kwargs or {}), kept)


def envelope_from_request(task: Any, args: Any, kwargs: Any) -> Envelope:
    """The envelope of the message a worker is executing (as ``Task.retry`` would resend it)."""
    signature = task.signature_from_request(task.request, list(args), dict(kwargs))
    options = dict(signature.options)
    options.pop("redelivered", None)
    return envelope_from_options(task.name, list(args), dict(kwargs), options)


@contextmanager
def detached_from_running_task() -> Iterator[None]:
    """Celery ties a message published inside a running task to that task (its parent and root
    ids, and a trail of results kept until the task ends). A re-publication is the same task
    again, not a child of whichever task happens to publish it: hide the running task."""
    stack = _task_stack.stack
    saved = list(stack)
    del stack[:]
    try:
        yield
    finally:
        stack[:] = saved


def publish(
    send: RawSend,
    envelope: Envelope,
    *,
    headers: Mapping[str, Any] | None = None,
    countdown_s: float | None = None,
) -> None:
    """Publish ``envelope`` with ``send`` (the app's original ``send_task``): with extra headers
    (a hand-off token), after ``countdown_s``."""
    options = dict(envelope.options)
    merged = {**(options.pop("headers", None) or {}), **(headers or {})}
    task_id = options.pop("task_id")
    extra: dict[str, Any] = {}
    if countdown_s is not None and countdown_s > 0:
        extra["countdown"] = countdown_s
    with detached_from_running_task():
        send(
            envelope.task,
            args=envelope.args,
            kwargs=envelope.kwargs,
            task_id=task_id,
            headers=merged,
            add_to_parent=False,
            **options,
            **extra,
        )
