"""Celery task events for governance outcomes, so Flower shows HELD, DENIED, DEFERRED, ...

Flower's state machine (``celery.events.state``) turns an unknown ``task-<name>`` event into the
task state ``<NAME>``. Each event carries tenant, agent, action and reason, and a readable
``result`` (the reason first), because Flower's API and its task list show only Celery's own
task fields (``Task._fields``): ``args``, ``kwargs``, ``result``, ``received``, ``expires``, ...

Events sent outside a worker (by a publisher, or ``govctl``) come from a node that is not a
worker. Flower's event state (``celery.events.state.State``) files every task event that is not
``task-sent`` under a worker named after the event's ``hostname``, so each such process used to
leave an offline ``gen<pid>@host`` on Flower's Workers page. :func:`send_app_event` sends from one
fixed node name, :data:`PUBLISHER_NODE`, and ends with that node's ``worker-offline``: Flower
forgets a node that announces it left (``State`` pops it from its workers), as it does when a
real worker shuts down, so the Workers page lists only real workers.

Every event here is sent only while a monitor asks for task events
(:mod:`governance.integration.monitor`): :func:`send_app_event` asks the app's runtime first.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from governance.integration.redaction import redact
from governance.integration.runtime import installed_on
from governance.policy.context import ActionContext

log = logging.getLogger("governance.events")

#: The node name of events sent outside a worker (never a worker's name).
PUBLISHER_NODE = f"governance-publisher@{socket.gethostname()}"


def event_fields(
    ctx: ActionContext | None, action: str, reason: str, **extra: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {"action": action, "reason": reason, **extra}
    if ctx is not None:
        fields.update(tenant=ctx.tenant, agent=ctx.agent, run=ctx.run)
    return fields


#: Events of a task that waits: it has not started (Flower shows no Started time until the
#: task-started of the run that follows).
WAITING_KINDS = frozenset({"deferred", "held"})


def flower_fields(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Fields Flower shows: the state itself and a readable ``result``.

    Flower ignores a state that ranks below the current one (``celery.states.PRECEDENCE``):
    REJECTED, a built-in state, ranks below HELD. Carrying ``state`` in the event sets it anyway.
    Flower's API only returns Celery's own task fields, so the reason goes into ``result``
    (unless the caller wrote a fuller one): for a task that waits, with its place in line
    (``ahead``) or its booked turn (``turn_ms``) when the event carries them. A task that waits
    is not running: the event clears the Started time and run time an earlier delivery set (the
    ``task-started`` of the run that follows its wait sets them again).
    """
    summary = f"{kind}: {fields.get('reason', '')}"
    if fields.get("tenant"):
        summary += f" (tenant {fields['tenant']}, action {fields.get('action', '')})"
    if fields.get("turn_ms"):
        summary += f"; its turn: {iso(int(fields['turn_ms']))}"
    elif fields.get("ahead") is not None and kind == "deferred":
        summary += f"; {int(fields['ahead'])} ahead of it in line"
    shown = {"state": kind.upper(), "result": summary, **fields}
    if kind in WAITING_KINDS:
        shown.update(started=None, runtime=None)
    return shown


#: The policy setting behind each limit a task can fail on, by the violation that names it
#: first in a ``LimitExceeded`` reason (``same_step_loop exceeded: 4 / 3 (133%)``).
LIMIT_SETTINGS = {
    "step_limit": "budgets[].steps",
    "token_limit": "budgets[].tokens",
    "input_token_limit": "budgets[].input_tokens",
    "output_token_limit": "budgets[].output_tokens",
    "tool_call_limit": "budgets[].tool_calls",
    "cost_limit": "budgets[].cost_usd",
    "wall_time_limit": "long_running.max_wall_time_s",
    "discovered_step_limit": "long_running.max_discovered_steps",
    "discovery_depth_limit": "long_running.max_discovery_depth",
    "idle_timeout": "long_running.idle_timeout_s",
    "same_step_loop": "long_running.max_same_step_repetitions",
    "cost_alert": "long_running.cost_alert_usd",
    "step_timeout": "step_timeout",
}


def limit_setting(reason: str) -> str | None:
    """The policy setting a limit failure's ``reason`` is about, or None: the violation that
    starts it (``same_step_loop exceeded: ...``), or a wait that ran out (``waited 612 s for
    concurrency_limit ...``: ``max_wait``)."""
    if reason.startswith("waited "):
        return "max_wait"
    first = reason.split(" ", 1)[0].rstrip(":")
    return LIMIT_SETTINGS.get(first)


def failure_summary(exception: str, reason: str) -> str:
    """The ``result`` Flower's list shows for a governed task that failed: what failed, its
    reason, and for a limit the policy setting behind it (the ``long_running`` presets set
    some of them for every tenant that says nothing)."""
    name = exception.split("(", 1)[0]
    if name == "LimitExceeded":
        setting = limit_setting(reason)
        where = f" (policy: {setting})" if setting else ""
        return f"limit: {reason}{where}"
    if name == "ActionFailed":
        return f"failed: {reason}"
    return f"failed: {exception}"


def iso(ms: int) -> str:
    """Epoch milliseconds as an ISO-8601 UTC time, e.g. ``2026-12-03T05:00:00Z``."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def call_fields(args: Any, kwargs: Any) -> dict[str, str]:
    """``args`` and ``kwargs`` as Celery's own events carry them (reprs), secrets redacted."""
    return {"args": repr(redact(list(args or ()))), "kwargs": repr(redact(dict(kwargs or {})))}


def held_summary(
    *,
    task_id: str,
    reason: str,
    tenant: str,
    agent: str,
    run: str,
    user: str,
    action: str,
    approvals: int,
    quorum: int | None,
    reviewers: list[str],
    expires_ms: int,
) -> str:
    """The ``result`` text of a held task in Flower: why, for whom, how far, until when, how.

    The first line is the reason, so Flower's task list (one line per task) shows it.
    """
    needed = f"{approvals} of {quorum}" if quorum is not None else str(approvals)
    lines = [
        f"held: {reason}",
        f"action: {action}; tenant: {tenant}; agent: {agent}; run: {run}",
        f"requested by: {user or '(unknown)'}",
        f"approvals: {needed}" + (f" (reviewers: {', '.join(reviewers)})" if reviewers else ""),
        f"expires: {iso(expires_ms)}",
        f"approve: govctl held approve {task_id} --key PATH",
        f"reject:  govctl held reject {task_id} --key PATH --reason '...'",
    ]
    return "\n".join(lines)


def events_wanted(app: Any) -> bool:
    """Whether a task event sent here and now is wanted (a monitor asks for them; see
    :mod:`governance.integration.monitor`). An app without governance: Celery decides."""
    runtime = installed_on(app)
    return runtime is None or runtime.events.wanted(app)


def send_app_event(app: Any, kind: str, task_id: str, **fields: Any) -> None:
    """Send ``task-<kind>`` for ``task_id`` from anywhere (a publisher, ``govctl``), as
    :data:`PUBLISHER_NODE`, then that node's ``worker-offline`` (see the module doc); nothing
    while no monitor asks for events."""
    send_app_events(app, kind, [(task_id, fields)])


def send_app_events(
    app: Any, kind: str, events: Iterable[tuple[str, dict[str, Any]]], *, check: bool = True
) -> int:
    """Send ``task-<kind>`` for each ``(task_id, fields)`` of ``events`` on one connection, as
    :data:`PUBLISHER_NODE`, then its ``worker-offline``; how many were sent. Nothing while no
    monitor asks for events (unless the caller checked already: ``check=False``)."""
    if check and not events_wanted(app):
        return 0
    sent = 0
    task_id = ""
    try:
        with app.amqp.producer_pool.acquire(block=True) as producer:
            # Fail fast when the broker is down: an event is not worth Celery's reconnect loop.
            producer.connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0.2
            )
            with app.events.Dispatcher(
                producer.connection, hostname=PUBLISHER_NODE, channel=producer.channel
            ) as dispatcher:
                for task_id, fields in events:
                    dispatcher.send(f"task-{kind}", uuid=task_id, **flower_fields(kind, fields))
                    sent += 1
                if sent:
                    dispatcher.send("worker-offline")
    except Exception:  # events are for live watching only; never fail the decision over one
        log.warning("could not send the task-%s event of %s", kind, task_id, exc_info=True)
    return sent
