"""A governed task that Celery drops without running it (revoked, or expired) ends in the ledger.

Celery's worker drops a revoked message, or one past its ``expires``, in its main process:
the task's body never runs, so neither does its admission, and its ledger record would stay
``queued``. The reconciler would then publish it again and again (a worker forgets revocations
after a while, or on a restart without ``--statedb``: the task would finally run), and a
hand-off it was given would keep its slot until its wait limit. ``task_revoked`` ends the record
instead, with a ``task_revoked`` audit entry, in one call (``AuditLog.end_task``). A task that
runs meanwhile (``revoke(terminate=True)``) keeps its record: the delivery that runs it ends it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from governance.integration.governed import is_governed
from governance.integration.headers import CONTEXT, HeaderError, header_value, read_context
from governance.integration.runtime import installed_on
from governance.store.audit import AuditEvent, AuditEventType

log = logging.getLogger("governance.lifecycle")

_connected: list[bool] = []


def connect() -> None:
    """Connect the ``task_revoked`` handler (once per process)."""
    if not _connected:
        _connected.append(True)
        signals.task_revoked.connect(_revoked, weak=False)


def _revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **_: Any,
) -> None:
    if sender is None or request is None or not is_governed(sender):
        return
    runtime = installed_on(sender.app)
    raw = header_value(getattr(request, "request_dict", request), CONTEXT)
    if runtime is None or raw is None:
        return  # never published by a governed publisher: nothing in the ledger
    try:
        ctx = read_context(raw)
    except HeaderError:
        return  # a malformed context names no tenant whose ledger could hold it
    if expired:
        reason = "expired before it ran (the message's expires passed)"
    elif terminated:
        reason = "revoked and terminated while it ran"
    else:
        reason = "revoked before it ran"
    runtime.end_without_running(
        AuditEvent(
            type=AuditEventType.TASK_REVOKED,
            tenant=ctx.tenant,
            agent=ctx.agent,
            run=ctx.run,
            task_id=str(request.id),
            action=str(sender.name),
            decision="deny",
            reason=reason,
        )
    )
    log.info("task %s %s: it leaves the ledger", request.id, reason)
