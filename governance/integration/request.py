"""The worker-side request class of governed tasks: names governance failures for Flower.

Celery reports every exception as ``task-failed``; a denial is not a crash, so this request
reports a task that ended with :class:`ActionDenied` as ``task-denied`` (state DENIED in Flower),
and one that ended with :class:`ApprovalRejected` as ``task-rejected``, each with the reason in
``result`` too (the column Flower's task list shows for every governance state). The result
backend still says FAILURE with the reason, as callers expect.
"""

from __future__ import annotations

import ast
from typing import Any

from celery.worker.request import Request

#: Exception class name (as it appears in the event's repr) -> governance event name.
_FAILURE_EVENTS = {"ActionDenied": "task-denied", "ApprovalRejected": "task-rejected"}


def reason_of(exception_repr: str) -> str:
    """The reason inside an exception's repr, e.g. ``ActionDenied('no')`` -> ``no``."""
    _, _, inner = exception_repr.partition("(")
    inner = inner.removesuffix(")").removesuffix(",")
    try:
        value = ast.literal_eval(inner)
    except (ValueError, SyntaxError):
        return exception_repr
    return value if isinstance(value, str) else exception_repr


class GovernedRequest(Request):  # type: ignore[misc]
    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-failed":
            exception = str(fields.get("exception", ""))
            name = exception.split("(", 1)[0]
            renamed = _FAILURE_EVENTS.get(name)
            if renamed is not None:
                type = renamed
                fields.setdefault("result", f"{renamed[5:]}: {reason_of(exception)}")
        super().send_event(type, **fields)
