"""No message can stop a worker: one that cannot be read is rejected, with a reason, and the
worker goes on.

Celery's consumer turns a message into a request in the worker's main process. Some malformed
messages make that raise an error it does not expect (a body of valid JSON but the wrong shape,
such as ``[1, 2]``, is unpacked as ``(args, kwargs, embed)``): the error escapes the consumer and
stops the worker's main process; on the Redis broker the message goes back to the queue and
stops each restarted worker in turn. Anyone who can publish to the broker could stop every
worker with one message.

:class:`GovernedConsumer` (Celery's ``worker_consumer``, set by ``setup.celery_conf``) catches any
such error for any task of the app, governed or plain: the message is rejected (dropped, or
dead-lettered where the queue has a dead-letter exchange), the task's result becomes FAILURE
with :class:`~governance.integration.errors.MessageRefused` saying why, a governed task's refusal
is audited (on its tenant's chain when its context names one, ending its ledger record), and the
worker keeps serving.

**Task events only while a monitor asks.** Celery's worker sends task events when started with
``-E``, or once a monitor's ``enable_events`` reaches it, and then until it stops, even after
the monitor is gone (Flower sends one every 5 s while it runs and never a ``disable_events``).
:class:`GovernedConsumer` gives them a lease
(:class:`~governance.integration.monitor.EventsLease`): each ``enable_events`` renews it for
``GOVERNANCE_EVENTS_LEASE_S``, and when it lapses the worker's task events are switched off
again (as ``disable_events`` would), for every task of the app, governed or plain; a
``disable_events`` ends it at once. A worker started with ``-E`` (or
``worker_send_task_events=True``, the user's: ``govern()`` sets neither) always sends. The
lease is the one the worker's main process follows for the layer's own events
(``runtime.events``); the maintenance thread tells publishers through the state Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.consumer.control import Control
from vine import promise  # type: ignore[import-untyped]

from governance.integration.errors import MessageRefused
from governance.integration.governed import is_governed
from governance.integration.headers import CONTEXT, HeaderError, read_context
from governance.integration.monitor import EventsLease
from governance.integration.runtime import installed_on
from governance.integration.worker.durable_ack import follow_consumer
from governance.store.audit import AuditEvent, AuditEventType

log = logging.getLogger("governance.consumer")

#: The longest a lapsed events lease goes unnoticed (a quarter of the lease when shorter).
LEASE_CHECK_S = 1.0


def _header(message: Any, name: str) -> Any:
    headers = getattr(message, "headers", None)
    return headers.get(name) if isinstance(headers, dict) else None


class GovernedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with a task handler that rejects what it cannot read, and task events
    only while a monitor asks for them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The worker's -E, or the app's worker_send_task_events (Celery's Events step reads the
        # same): always on.
        always = bool(kwargs.get("task_events"))
        runtime = installed_on(self.app)
        lease_s = runtime.settings.events_lease_s if runtime is not None else 15.0
        self.events_lease = EventsLease(lease_s, always=always)
        if runtime is not None:
            runtime.events.follow_worker(self.events_lease)
        self._lease_control_commands()
        follow_consumer(self)  # its prefetch rises for deliveries awaiting durability
        if not always and self.timer is not None:
            self.timer.call_repeatedly(min(LEASE_CHECK_S, lease_s / 4), self._end_lapsed_events)

    def _lease_control_commands(self) -> None:
        """This worker's remote control answers ``enable_events`` and ``disable_events`` as
        Celery does, and renews or ends the lease (its own handlers: Celery's registry, shared
        by every app of the process, is left as it is)."""
        box = next((step.box for step in self.blueprint.order if isinstance(step, Control)), None)
        if box is None:  # no remote control (worker_enable_remote_control off): no monitor
            return
        handlers = dict(box.node.handlers)
        lease = self.events_lease
        enable, disable = handlers["enable_events"], handlers["disable_events"]

        def enable_events(state: Any, **kwargs: Any) -> Any:
            reply = enable(state, **kwargs)
            lease.asked()
            return reply

        def disable_events(state: Any, **kwargs: Any) -> Any:
            lease.stopped()
            return disable(state, **kwargs)

        handlers.update(enable_events=enable_events, disable_events=disable_events)
        box.node.handlers = handlers

    def _end_lapsed_events(self) -> None:
        """No monitor asked within the lease: task events off, as ``disable_events`` does."""
        dispatcher = self.event_dispatcher
        if dispatcher is None or self.events_lease.on():
            return
        groups = dispatcher.groups
        if groups and "task" in groups:
            groups.discard("task")
            log.info(
                "task events off: no monitor asked for them in the last %g s",
                self.events_lease.lease_s,
            )

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        handler: Callable[[Any], Any] = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                return handler(message)
            except self.connection_errors:
                raise  # the broker connection failed: Celery's own recovery applies
            except Exception as exc:
                self._refuse(message, exc)
                return None

        return on_task_received

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A message Celery itself finds invalid (a malformed ``eta``, say): Celery rejects it
        and logs; its sender is also told why (a FAILURE result) and a governed task audited."""
        super().on_invalid_task(body, message, exc)
        self._refuse(message, exc, logged=True)

    def _refuse(self, message: Any, exc: Exception, logged: bool = False) -> None:
        """Reject ``message``, say why where its sender and operators look, and go on."""
        task_id = _header(message, "id")
        name = _header(message, "task")
        reason = (
            f"the message of task {name or '?'} ({task_id or 'no id'}) cannot be read, "
            f"rejected without running: {type(exc).__name__}: {exc}"
        )
        if not logged:
            log.error("%s", reason, exc_info=True)
        if not getattr(message, "acknowledged", False):
            message.reject_log_error(log, self.connection_errors)
        if isinstance(task_id, str) and task_id:
            try:
                self.app.backend.mark_as_failure(task_id, MessageRefused(reason))
            except Exception:
                log.warning("could not store the refusal of %s", task_id, exc_info=True)
        task = self.app.tasks.get(name) if isinstance(name, str) else None
        if task is not None and is_governed(task):
            self._audit(message, task_id if isinstance(task_id, str) else "", name, reason)

    def _audit(self, message: Any, task_id: str, name: str, reason: str) -> None:
        runtime = installed_on(self.app)
        if runtime is None:
            return
        try:
            ctx = read_context(_header(message, CONTEXT))
        except (HeaderError, TypeError, ValueError):
            ctx = None
        event = AuditEvent(
            type=AuditEventType.AUTHORIZATION_DENIED,
            tenant=ctx.tenant if ctx else "",
            agent=ctx.agent if ctx else "",
            run=ctx.run if ctx else "",
            task_id=task_id,
            action=name,
            decision="deny",
            reason=reason[:2000],
            detail={"at": "worker", "message": "malformed"},
        )
        if ctx is not None and task_id:
            runtime.end_without_running(event)
        else:
            runtime.audit(event)
