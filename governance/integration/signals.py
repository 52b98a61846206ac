"""Celery signal handlers: context inheritance for child tasks, and the maintenance thread.

A task enqueued from inside a governed task's body, without a context of its own, inherits the
parent's tenant, agent and run, one level deeper: it is a discovered step, so the long-running
limits (discovered steps, discovery depth) apply to it.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from governance.integration.execution import current_execution
from governance.integration.headers import CONTEXT, GovernanceHeaders

_connected: set[int] = set()
_pumps: dict[int, Any] = {}


def child_context_headers(headers: dict[str, Any]) -> None:
    """Fill in the governance headers of a message published inside a governed body."""
    parent = current_execution()
    if parent is None or headers.get(CONTEXT):
        return
    child = parent.context.model_copy(
        update={
            "discovery_depth": parent.context.discovery_depth + 1,
            "parent_task_id": parent.task_id,
        }
    )
    headers.update(GovernanceHeaders(context=child).to_headers())


def _before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        child_context_headers(headers)


def connect(app: Any) -> None:
    """Connect the handlers once per app."""
    if id(app) in _connected:
        return
    _connected.add(id(app))
    signals.before_task_publish.connect(_before_publish, weak=False)

    def start_pump(sender: Any = None, **_: Any) -> None:
        from governance.integration.maintenance import MaintenanceThread
        from governance.integration.runtime import runtime_for

        pump = MaintenanceThread(app, runtime_for(app))
        pump.start()
        _pumps[id(app)] = pump

    def stop_pump(sender: Any = None, **_: Any) -> None:
        pump = _pumps.pop(id(app), None)
        if pump is not None:
            pump.stop()

    signals.worker_ready.connect(start_pump, weak=False)
    signals.worker_shutdown.connect(stop_pump, weak=False)
