"""The governed task currently running in this thread: its context and the usage it reports.

The LLM task reports the tokens and cost it used through :func:`report_usage`; tasks enqueued
from inside a governed body inherit its context (see :mod:`governance.integration.signals`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.usage import Usage

_local = threading.local()


@dataclass
class Execution:
    """One running attempt of one governed task."""

    task_id: str
    context: ActionContext
    attempt: int
    action: Action
    usage: Usage = field(default_factory=Usage)

    def report(self, usage: Usage) -> None:
        self.usage = self.usage + usage


def current_execution() -> Execution | None:
    """The governed task running in this thread, if any."""
    return getattr(_local, "execution", None)


def report_usage(usage: Usage) -> None:
    """Add ``usage`` (tokens, cost) to the running governed task; it is settled at the end."""
    execution = current_execution()
    if execution is None:
        raise RuntimeError("report_usage() called outside a governed task body")
    execution.report(usage)


@contextmanager
def running(execution: Execution) -> Iterator[Execution]:
    previous = current_execution()
    _local.execution = execution
    try:
        yield execution
    finally:
        _local.execution = previous
