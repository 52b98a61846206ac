"""The governed task currently running in this thread: its context and the usage it reports.

The LLM task reports the tokens and cost it used through :func:`report_usage`, or, when it cannot
know them (an answer without usage), says so with :func:`report_usage_unknown`: the settlement
then counts the attempt's whole reservation. Tasks enqueued from inside a governed body inherit
its context (see :mod:`governance.integration.signals`).
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
    #: Why what this attempt used cannot be known, when it cannot (see ``report_usage_unknown``).
    usage_unknown: str | None = None

    def report(self, usage: Usage) -> None:
        self.usage = self.usage + usage

    def report_unknown(self, reason: str) -> None:
        self.usage_unknown = reason


def current_execution() -> Execution | None:
    """The governed task running in this thread, if any."""
    return getattr(_local, "execution", None)


def report_usage(usage: Usage) -> None:
    """Add ``usage`` (tokens, cost) to the running governed task; it is settled at the end."""
    execution = current_execution()
    if execution is None:
        raise RuntimeError("report_usage() called outside a governed task body")
    execution.report(usage)


def report_usage_unknown(reason: str) -> None:
    """Say that what the running governed task used cannot be known (a provider answered
    without usage, a call was sent and its answer lost): its settlement counts the attempt's
    whole reservation (at least; usage reported as well counts where it is higher), and its
    audit entry says the spend was assumed, and why. A body that raises an ``ActionError`` with
    ``outcome_unknown`` needs not call this: the same happens."""
    execution = current_execution()
    if execution is None:
        raise RuntimeError("report_usage_unknown() called outside a governed task body")
    execution.report_unknown(reason)


@contextmanager
def running(execution: Execution) -> Iterator[Execution]:
    previous = current_execution()
    _local.execution = execution
    try:
        yield execution
    finally:
        _local.execution = previous
