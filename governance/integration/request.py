"""The worker-side request class of governed tasks: names governance failures for Flower.

Celery reports every exception as ``task-failed``; a denial is not a crash, so this request
reports a task that ended with :class:`ActionDenied` as ``task-denied`` (state DENIED in Flower).
The result backend still says FAILURE with the reason, as callers expect.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

#: Exception class name (as it appears in the event's repr) -> governance event name.
_FAILURE_EVENTS = {"ActionDenied": "task-denied", "ApprovalRejected": "task-rejected"}


class GovernedRequest(Request):  # type: ignore[misc]
    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-failed":
            name = str(fields.get("exception", "")).split("(", 1)[0]
            type = _FAILURE_EVENTS.get(name, type)
        super().send_event(type, **fields)
