"""A governed task's two round trips overlap Celery's own instead of adding to them.

Admission: in ``task_prerun`` (before Celery stores STARTED, with ``task_track_started``) a
delivery whose context, action and authorization need nothing but the policy (an ``act_auto``
action, no approvals to verify) writes its admission; the task's body reads the decision, after
Celery's write. Anything else (a denial, a hold, a store that does not answer) is left to the
task itself, which goes the usual way with the same delivery id, so an admission written twice
is recognized as one.

Settlement: when the body has run, the settlement is written before the task returns; Celery
stores the result, and only then, in ``task_postrun``, is the settlement's reply read, its
hand-offs and retry published. It is still confirmed (or owed, see
:mod:`governance.integration.unsettled`) before the worker's main process acknowledges the
delivery: Celery sends ``task_postrun`` from the pool process before it reports the task done.
A task called directly (no tracer, no signals) does both at once, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals

from governance.integration.governed import is_governed

log = logging.getLogger("governance.lifecycle")

#: Attributes on the request of one delivery (Celery builds a new one per delivery).
_TRACED = "governance_traced"
_STARTED = "governance_started"
_FINISH = "governance_finish_settlement"

_connected: list[bool] = []


def settling_after_result(task: Any) -> bool:
    """Whether ``task``'s current delivery runs in Celery's tracer, which sends ``task_postrun``
    after storing the result (so its settlement can be read then)."""
    request = task.request
    return bool(getattr(request, _TRACED, False)) and not request.called_directly


def defer_settlement(task: Any, finish: Callable[[], None]) -> None:
    """Run ``finish`` (read the settlement, publish what follows) in ``task_postrun``."""
    setattr(task.request, _FINISH, finish)


def started_delivery(task: Any) -> Any:
    """What ``task_prerun`` started for the current delivery of ``task`` (taken once), or None."""
    request = task.request
    started = getattr(request, _STARTED, None)
    if started is not None:
        setattr(request, _STARTED, None)
    return started


def _start_delivery(
    sender: Any = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    if task is None or not is_governed(task):
        return
    request = task.request
    setattr(request, _TRACED, True)
    start = getattr(task, "start_delivery", None)
    if start is None:
        return
    try:
        setattr(request, _STARTED, start(tuple(args or ()), dict(kwargs or {})))
    except Exception:
        # The body goes every step itself and meets the same problem, where it is handled.
        log.debug("could not start the admission of task %s early", request.id, exc_info=True)


def _finish_settlement(sender: Any = None, task: Any = None, **_: Any) -> None:
    finish = getattr(task.request, _FINISH, None) if task is not None else None
    if finish is None:
        return
    setattr(task.request, _FINISH, None)
    try:
        finish()
    except Exception:
        log.exception("settling task %s after its result failed", getattr(task.request, "id", "?"))


def connect() -> None:
    """Connect the two handlers, once per process."""
    if _connected:
        return
    _connected.append(True)
    signals.task_prerun.connect(_start_delivery, weak=False)
    signals.task_postrun.connect(_finish_settlement, weak=False)
