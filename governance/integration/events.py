"""Celery task events for governance outcomes, so Flower shows HELD, DENIED, DEFERRED, ...

Flower's state machine (``celery.events.state``) turns an unknown ``task-<name>`` event into the
task state ``<NAME>``. Each event carries tenant, agent, action and reason.
"""

from __future__ import annotations

import logging
from typing import Any

from governance.policy.context import ActionContext

log = logging.getLogger("governance.events")


def event_fields(
    ctx: ActionContext | None, action: str, reason: str, **extra: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {"action": action, "reason": reason, **extra}
    if ctx is not None:
        fields.update(tenant=ctx.tenant, agent=ctx.agent, run=ctx.run)
    return fields


def flower_fields(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Fields Flower shows: the state itself and a readable ``result``.

    Flower ignores a state that ranks below the current one (``celery.states.PRECEDENCE``):
    REJECTED, a built-in state, ranks below HELD. Carrying ``state`` in the event sets it anyway.
    Flower's API only returns Celery's own task fields, so the reason goes into ``result``.
    """
    summary = f"{kind}: {fields.get('reason', '')}"
    if fields.get("tenant"):
        summary += f" (tenant {fields['tenant']}, action {fields.get('action', '')})"
    return {"state": kind.upper(), "result": summary, **fields}


def send_app_event(app: Any, kind: str, task_id: str, **fields: Any) -> None:
    """Send ``task-<kind>`` for ``task_id`` from anywhere (a publisher, ``govctl``)."""
    try:
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send(f"task-{kind}", uuid=task_id, **flower_fields(kind, fields))
    except Exception:  # events are for live watching only; never fail the decision over one
        log.warning("could not send the task-%s event of %s", kind, task_id, exc_info=True)
