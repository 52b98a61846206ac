"""The publisher side: every governed task leaves with its context, authorized and recorded.

``install`` wraps the app's ``send_task``, the one call that ``delay``, ``apply_async``,
``send_task`` and canvas (chains, groups, chords) all go through. For a governed task it:

1. finds the context: the one given in the headers, else the innermost ``with
   governance_context(...)``, else the governed task whose body is publishing (a child is a
   discovered step of the same run, one level deeper), else the governed task that just finished
   (the next link of a chain: the same step level); without any, it fails at once with
   :class:`MissingContext`, which says how to give one;
2. authorizes the action, so a caller learns about a denial at once and nothing is enqueued
   (the worker authorizes again all the same: anyone who can reach the broker can publish);
3. holds an approval-tier action in the held store instead of the broker (its result says HELD);
4. records the task in the ledger with its message, then publishes it. A countdown longer than
   the safe broker limit is not given to the broker at all: the task is parked in the ledger and
   published when due (celery #2599: a long countdown runs twice on the Redis broker).

Once recorded, the task is accepted: if the broker then refuses it (down, unreachable), the
caller still gets its result and a warning, and the reconciler publishes the recorded message
when it is overdue. With ``GOVERNANCE_STATE_DURABILITY`` set, a task that lives only in the
state Redis from here (held, parked, waiting from publication, refused by the broker) is
returned only once its record is confirmed durable (``runtime.confirm_recorded``; otherwise
``NotDurable``). Raising instead would tell the caller it was not enqueued while the record
makes it run all the same; a caller that then submitted it again would run the action twice.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

from celery import current_task
from kombu.exceptions import OperationalError

from governance.integration.approvals.gate import ApprovalGate
from governance.integration.approvals.holding import Holding
from governance.integration.audit_fields import audit_template
from governance.integration.errors import ActionDenied, GovernanceError
from governance.integration.events import call_fields, event_fields, send_app_event
from governance.integration.execution import current_execution
from governance.integration.governed import Governable, is_governed
from governance.integration.headers import (
    CONTEXT,
    HANDOFF,
    LEDGER,
    context_json,
    header_value,
    read_context,
)
from governance.integration.messages import RawSend, envelope_from_options
from governance.integration.pool_view import queue_of
from governance.integration.redaction import redact
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.integration.waiting_results import store_waiting_state
from governance.policy.actions import Action
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.tiers import Outcome
from governance.store.admission import AdmissionStatus
from governance.store.audit import AuditEvent, AuditEventType

log = logging.getLogger("governance.publish")

_context: contextvars.ContextVar[ActionContext | None] = contextvars.ContextVar(
    "governance_context", default=None
)


class MissingContext(GovernanceError):
    """A governed task was published with no governance context to run under."""


@contextmanager
def governance_context(ctx: ActionContext | None = None, **fields: Any) -> Iterator[ActionContext]:
    """Publish governed tasks inside this block on behalf of ``ctx`` (or of
    ``ActionContext(**fields)``): ``task.delay(...)``, ``apply_async``, ``send_task``, chains
    and groups all carry it."""
    context = ctx if ctx is not None else ActionContext(**fields)
    token = _context.set(context)
    try:
        yield context
    finally:
        _context.reset(token)


def _finished_parent_context() -> ActionContext | None:
    """The context of the governed task the worker is finishing (it publishes its chain)."""
    task = current_task
    request = getattr(task, "request", None) if task is not None else None
    raw = header_value(request, CONTEXT) if request is not None else None
    if raw is None or not is_governed(task):
        return None
    try:
        return read_context(raw)
    except ValueError:
        return None


def context_for_publishing() -> ActionContext | None:
    """The context a governed task published here and now runs under (see the module doc)."""
    explicit = _context.get()
    parent = current_execution()
    if explicit is not None:
        if parent is not None and (parent.context.tenant, parent.context.run) == (
            explicit.tenant,
            explicit.run,
        ):
            return _child_of(explicit, parent.context.discovery_depth, parent.task_id)
        return explicit
    if parent is not None:
        return _child_of(parent.context, parent.context.discovery_depth, parent.task_id)
    return _finished_parent_context()


def _child_of(ctx: ActionContext, parent_depth: int, parent_task_id: str) -> ActionContext:
    return ctx.model_copy(
        update={
            "discovery_depth": max(ctx.discovery_depth, parent_depth + 1),
            "parent_task_id": parent_task_id,
        }
    )


def wrap_send_task(app: Any) -> RawSend:
    """Route ``app.send_task`` (and so every publishing call of the app) through governance,
    once; returns the original ``send_task``, which publishes straight to the broker."""
    original: RawSend | None = getattr(app, "_governance_raw_send", None)
    if original is not None:
        return original
    original = app.send_task
    assert original is not None

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        task = options.get("task_type") or app.tasks.get(name)
        if not is_governed(task):
            return original(name, args, kwargs, **options)
        return publish_governed(app, runtime_for(app), task, name, args, kwargs, options)

    app.send_task = send_task
    app._governance_raw_send = original
    return original


def publish_governed(
    app: Any,
    runtime: GovernanceRuntime,
    task: Governable,
    name: str,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
) -> Any:
    """Authorize, hold or record, and publish one governed task (see the module doc)."""
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    headers = dict(options.pop("headers", None) or {})
    if headers.get(CONTEXT) is not None:
        try:
            ctx = read_context(headers[CONTEXT])
        except ValueError as exc:
            raise ActionDenied(str(exc)) from None
    else:
        found = context_for_publishing()
        if found is None:
            raise MissingContext(
                f"task {name!r} is governed and was published without a governance context: "
                "publish it inside `with governance_context(tenant=..., agent=..., run=...):` "
                "(from governance.integration), or from a governed task's body"
            )
        ctx = found
    task_id = str(options.pop("task_id", None) or uuid.uuid4())
    denied = _Denial(app, runtime, ctx, task_id, name, args, kwargs)
    try:
        action = task.action_for(args, kwargs)
    except ActionDenied as exc:
        denied(name, exc.reason, "")
    decision = runtime.policy.authorize(ctx, action)
    if decision.outcome is Outcome.hold:
        decision = ApprovalGate(runtime).lift_with_grant(ctx, action, decision)
    if decision.outcome is Outcome.deny:
        denied(action.name, decision.reason, _tier(decision))
    tenant = runtime.policy.tenant(ctx.tenant)
    assert tenant is not None  # authorization denies unknown tenants
    try:
        task.prepare(action, tenant)
    except ActionDenied as exc:
        denied(action.name, exc.reason, _tier(decision))
    headers[CONTEXT] = context_json(ctx)
    headers[LEDGER] = 1
    _redacted_reprs(args, kwargs, options)
    result_cls = options.get("result_cls") or app.AsyncResult
    due_ms, countdown = _due(options)
    envelope = envelope_from_options(
        name, args, kwargs, {**options, "task_id": task_id, "headers": headers}
    )
    if decision.outcome is Outcome.hold:
        Holding(app, runtime).hold(
            envelope, context=ctx, action=action, decision=decision, at_publish=True
        )
        runtime.confirm_recorded(ctx.tenant, task_id)
        return result_cls(task_id)
    parked = countdown is not None and countdown > runtime.settings.countdown_limit_s
    load = runtime.ledger.record_published(
        ctx.tenant, task_id, envelope.to_json(), due_ms=due_ms, parked=parked
    )
    if parked:
        runtime.confirm_recorded(ctx.tenant, task_id)
        return result_cls(task_id)
    if not countdown:
        # Work that cannot run now waits in Redis from here, never in the broker (fair dispatch):
        # over its tenant's concurrency, behind its tenant's waiting tasks, or beyond the pool.
        queue = queue_of(app, name, options)
        saturated = runtime.pool_view.saturated(queue)
        # Beyond the pool: the tenant alone has more in flight than the pool keeps running or
        # in the broker (its capacity plus the prefetch, or the slack's worth of the tenant's
        # work), so this task waits for the pool (saturated from now) rather than the broker.
        # Below that bound (a paced stream, short tasks) the broker takes it: the hot path.
        # (Past the capacity only is the tenant's mean run time read, for the bound.)
        in_flight = load.running + load.queued
        capacity = runtime.pool_view.capacity(queue)
        beyond = (
            not saturated
            and 0 < capacity < in_flight
            and in_flight > runtime.pool_view.in_flight_bound(queue, ctx.tenant)
        )
        if saturated or beyond or load.must_wait(tenant.concurrency):
            token = _wait_or_hand(
                app, runtime, ctx, task_id, action, decision, queue, saturated or beyond, beyond
            )
            if token is None:
                runtime.confirm_recorded(ctx.tenant, task_id)
                return result_cls(task_id)
            if token:
                headers[HANDOFF] = token
    try:
        return runtime.send_raw(name, args, kwargs, task_id=task_id, headers=headers, **options)
    except OperationalError as exc:
        log.warning(
            "the broker did not take task %s (%s, tenant %s): %s; it is recorded, and the "
            "reconciler publishes it once it is overdue (GOVERNANCE_RECONCILE_AFTER_S, %s s)",
            task_id,
            name,
            ctx.tenant,
            exc,
            runtime.settings.reconcile_after_s,
        )
        runtime.confirm_recorded(ctx.tenant, task_id)
        return result_cls(task_id)


#: A publisher registers a tenant whose tasks wait for a pool at most this often (the pool keeps
#: it until it has nothing left; settlements and the maintenance leader register it too).
REGISTER_EVERY_S = 0.25
_registered: dict[tuple[str, str], float] = {}


def _wait_or_hand(
    app: Any,
    runtime: GovernanceRuntime,
    ctx: ActionContext,
    task_id: str,
    action: Action,
    decision: Decision,
    queue: str,
    saturated: bool,
    saturate: bool = False,
) -> str | None:
    """Admit the task at publication (see ``admit.lua``): None when it waits (in its tenant's
    wait list; its result says DEFERRED, and a saturated pool learns its tenant waits); a
    hand-off token when a slot is kept for it; "" when its delivery decides.

    ``saturated``: the task waits for the pool (fair dispatch hands it on). ``saturate``: the
    tenant alone has more in flight than the pool's capacity, so the pool learns at once that
    it waits (not at most every ``REGISTER_EVERY_S``), which saturates the pool."""
    tenant = runtime.policy.tenant(ctx.tenant)
    assert tenant is not None
    admission = runtime.admitter.admit(
        ctx=ctx,
        action=action,
        task_id=task_id,
        attempt=0,
        estimate=runtime.policy.estimate_usage(action),
        limits=runtime.limits_for(tenant, action),
        holder=f"publish:{task_id}",
        template=audit_template(ctx, task_id, action, runtime.policy.version, _tier(decision)),
        reclaim=runtime.health.may_reclaim,
        at_publish=True,
        pool_wait=saturated,
        queue=queue,
    )
    runtime.publish_each(admission.publish)
    if admission.status is AdmissionStatus.HANDED:
        return admission.token
    if admission.status is not AdmissionStatus.WAITING:
        return ""
    violation = admission.violation.type.value if admission.violation else "capacity"
    meta = {
        "reason": admission.reason,
        "violation": violation,
        "waiting": "wait list",
        "ahead": admission.ahead,
        "at": "publish",
    }
    store_waiting_state(app.backend, task_id, "DEFERRED", meta)
    fields = event_fields(ctx, action.name, admission.reason, violation=violation)
    send_app_event(app, "deferred", task_id, **fields, ahead=admission.ahead)
    if saturated:
        now = time.monotonic()
        last = _registered.get((queue, ctx.tenant), -REGISTER_EVERY_S)
        if saturate or now - last >= REGISTER_EVERY_S:
            _registered[(queue, ctx.tenant)] = now
            grant = runtime.pool_view.pools.dispatch(
                queue, register=[(ctx.tenant, tenant.weight)], give=False
            )
            runtime.pool_view.noted(queue, grant.saturated)
    return None


def _redacted_reprs(args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> None:
    """Workers show a message's ``argsrepr``/``kwargsrepr`` in their events (Flower's args and
    kwargs): when the call has secret-looking keys, those reprs have the values redacted. The
    envelope keeps them, so every re-publication of the task shows the same."""
    for option, value in (("argsrepr", list(args)), ("kwargsrepr", kwargs)):
        if option not in options:
            shown = redact(value)
            if shown != value:
                options[option] = repr(shown)


def _tier(decision: Decision) -> str:
    return decision.tier.value if decision.tier else ""


def _due(options: dict[str, Any]) -> tuple[int | None, float | None]:
    """When the caller wants the task to run (``countdown`` or ``eta``), and the countdown."""
    now = time.time()
    countdown = options.get("countdown")
    eta = options.get("eta")
    if countdown is None and eta is not None:
        when = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        countdown = max(0.0, when.timestamp() - now)
    if countdown is None:
        return None, None
    countdown = float(countdown)
    if countdown > 0:
        options.pop("eta", None)
        options["countdown"] = countdown
    return int((now + countdown) * 1000), countdown


class _Denial:
    """Deny a task at publish time: audit it, show it in Flower, raise :class:`ActionDenied`.

    Nothing reaches the broker, so without its own event Flower would never hear of the task:
    ``task-denied`` lists it as DENIED with the reason (in ``result`` and ``exception``), its
    name, its call (secrets redacted) and the time. The task id is the one the caller would have
    got; the audit entry carries it too.
    """

    def __init__(
        self,
        app: Any,
        runtime: GovernanceRuntime,
        ctx: ActionContext,
        task_id: str,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.app, self.runtime, self.ctx = app, runtime, ctx
        self.task_id, self.name, self.args, self.kwargs = task_id, name, args, kwargs

    def __call__(self, action: str, reason: str, tier: str) -> NoReturn:
        ctx = self.ctx
        self.runtime.audit(
            AuditEvent(
                type=AuditEventType.AUTHORIZATION_DENIED,
                tenant=ctx.tenant,
                agent=ctx.agent,
                run=ctx.run,
                task_id=self.task_id,
                action=action,
                decision="deny",
                reason=reason,
                tier=tier,
                detail={"at": "publish"},
            )
        )
        send_app_event(
            self.app,
            "denied",
            self.task_id,
            name=self.name,
            received=time.time(),
            exception=repr(ActionDenied(reason)),
            at="publish",
            **call_fields(self.args, self.kwargs),
            **event_fields(ctx, action, reason),
        )
        raise ActionDenied(reason)


def submit(task: Any, ctx: ActionContext, *args: Any, **kwargs: Any) -> Any:
    """Publish ``task(*args, **kwargs)`` for ``ctx``: ``task.apply_async`` inside
    ``governance_context(ctx)``. Raises :class:`ActionDenied` (nothing is enqueued) when the
    policy denies it; an approval-tier action's result says ``HELD``."""
    with governance_context(ctx):
        return task.apply_async(args, kwargs)
