"""Where a governed task is, in words an agent (and the person watching it) can read.

A :class:`TaskView` is read from the ledger (where the task is: queued, waiting, running, held,
done), the held store (approvals so far) and the result backend (the state, the DEFERRED
state's reason and place in line, the result). Nothing here reads Celery events, which exist only
while a monitor listens. The functions below only format: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Celery states after which nothing more happens to a task.
DONE_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

_FIGURES = re.compile(r"exceeded: ([\d.$]+) / ([\d.$]+)")

#: How the DEFERRED state's ``violation`` reads in a progress message.
_LIMIT_WORDS = {
    "concurrency_limit": "concurrency",
    "run_concurrency_limit": "runs in flight",
    "rate_limit": "rate limit",
    "cooldown": "provider cooldown",
    "store_unavailable": "state store unavailable",
}


@dataclass(frozen=True)
class TaskView:
    """One look at a task: its Celery state, its place in the ledger, and what to tell."""

    task_id: str
    #: The result backend's state (PENDING, STARTED, DEFERRED, HELD, SUCCESS, FAILURE, ...).
    state: str
    #: The ledger's ``where`` (queued, parked, waiting, handed, running, held, done; "" unknown).
    where: str = ""
    #: The progress message: "waiting: concurrency 3/3, 2 ahead", "held: 1 of 2 approvals", ...
    message: str = ""
    #: The return value of a task that succeeded.
    result: Any = None
    #: What a task that did not succeed ended with ("ActionDenied: ...").
    error: str | None = None
    #: Held for approval now.
    held: bool = False
    #: Extra facts for the structured answer (approvals, quorum, ahead, turn).
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    @property
    def started(self) -> bool:
        """The body may be running (or ran): a cancellation no longer stops it by revoking."""
        return self.where in ("running", "done") or self.state in ("STARTED", "RETRY")


def _amount(text: str) -> float:
    return float(text.lstrip("$"))


def _count(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"


def waiting_text(info: Mapping[str, Any], *, now_ms: int) -> str:
    """The DEFERRED state of a task, as a progress message.

    ``{"violation": "concurrency_limit", "reason": "concurrency_limit exceeded: 4 / 3 (133%)",
    "ahead": 2}`` reads "waiting: concurrency 3/3, 2 ahead" (the figures count this task; the
    message counts those running); a booked turn reads "waiting: rate limit, turn in 1.2 s".
    """
    violation = str(info.get("violation") or "capacity")
    reason = str(info.get("reason") or "")
    label = _LIMIT_WORDS.get(violation, violation.replace("_", " "))
    figures = _FIGURES.search(reason)
    if figures is not None and violation in ("concurrency_limit", "run_concurrency_limit"):
        current, limit = _amount(figures.group(1)), _amount(figures.group(2))
        label = f"{label} {_count(max(current - 1, 0))}/{_count(limit)}"
    elif figures is not None:
        label = f"{label} {figures.group(1)}/{figures.group(2)} reserved or used"
    if "turn_ms" in info:
        seconds = max(0.0, (int(info["turn_ms"]) - now_ms) / 1000)
        return f"waiting: {label}, turn in {seconds:.1f} s"
    if "retry_in_s" in info:
        return f"waiting: {label}, trying again in {info['retry_in_s']} s"
    if "ahead" in info:
        ahead = int(info.get("ahead") or 0)
        return f"waiting: {label}, {ahead} ahead" if ahead else f"waiting: {label}, next in line"
    return f"waiting: {label}"


def held_text(approvals: int, quorum: int, kind: str = "hold") -> str:
    """A held task as a progress message: "held: 1 of 2 approvals"."""
    what = "held at the run's cost alert" if kind == "cost_alert" else "held"
    noun = "approval" if quorum == 1 else "approvals"
    return f"{what}: {approvals} of {quorum} {noun}"


def where_text(where: str, state: str) -> str:
    """A task that neither waits nor is held, as a progress message."""
    if state == "STARTED" or where == "running":
        return "running"
    if state == "RETRY":
        return "failed, retrying"
    return {
        "queued": "queued",
        "parked": "parked until its turn",
        "handed": "a slot is free: starting",
        "held": "held",
        "done": "finishing",
    }.get(where, "queued")


def error_text(exc: Any) -> str:
    """A task's failure as the answer says it: ``ActionDenied: <reason>``."""
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Mapping) and "exc_type" in exc:
        message = exc.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        return f"{exc['exc_type']}: {message}"
    return str(exc)
