"""The Celery task base class that governs every task built on it.

``@app.task(base=GovernedTask)`` on an ordinary function is enough: the action is a tool call
named after the task (or after its ``governance_tool`` option), with the bound arguments as its
input. LLM tasks use :class:`GovernedLLMTask` (their keyword arguments are an ``LLMCall``).
``build_action`` remains for a custom mapping; anything that goes wrong in it is a clear denial.
``Celery(task_cls=GovernedTask)`` governs every task of an app (Celery's built-in tasks excepted);
an app is governed from the environment when its first governed task is bound to it, unless
:func:`~governance.integration.setup.govern` was called first.
The base class runs the life of a delivery (:mod:`governance.integration.worker.delivery`)
around the body on every delivery; ``self.retry()``, ``autoretry_for`` and ``max_retries`` work
as in Celery, within the governance retry policy.
"""

from __future__ import annotations

import contextlib
import inspect
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from pydantic import ValidationError

from governance.integration.errors import (
    GOVERNANCE_ERRORS,
    RETRIES_EXHAUSTED,
    ActionDenied,
    GovernedRetry,
)
from governance.integration.governed import is_governed
from governance.integration.runtime import govern_bound_app
from governance.integration.worker.delivery import Acknowledged, Delivery
from governance.integration.worker.durable_ack import AckWhenDurable
from governance.integration.worker.overlap import started_delivery
from governance.policy.actions import Action, LLMCall, ToolCall
from governance.policy.tenant import TenantPolicy


def _validation_text(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )


class GovernedTask(Task):  # type: ignore[misc]
    """A task whose every delivery is authorized, admitted, settled and audited."""

    #: Marks the task for the publisher and the worker (any class with it is governed).
    governed = True
    #: The tool name in the policy; default: the task's name.
    governance_tool: str | None = None
    #: Governance outcomes are expected: workers log them without a traceback.
    throws = GOVERNANCE_ERRORS
    #: Shows governance failures in Flower as DENIED/REJECTED instead of FAILURE.
    Request = "governance.integration.worker.request:GovernedRequest"
    #: A worker killed mid-task must not lose the message: acknowledge only after it ran.
    acks_late = True
    reject_on_worker_lost = True

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Celery binds every task class to its app: a governed one governs the app too."""
        bound = super().bind(app)
        if cls.name and is_governed(cls):
            govern_bound_app(app)
        return bound

    @property
    def tool_name(self) -> str:
        """The name of the tool this task is in the policy."""
        return self.governance_tool or str(self.name)

    def build_action(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        """The action this call takes. Default: a tool call of ``governance_tool`` (or the
        task's name) whose input is the bound arguments, by parameter name."""
        try:
            bound = self._run_signature().bind(*args, **kwargs)
        except TypeError as exc:
            raise ActionDenied(f"invalid arguments for task {self.name!r}: {exc}") from None
        tool_input: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = bound.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                tool_input.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                tool_input[name] = list(value)
            else:
                tool_input[name] = value
        return ToolCall(tool=self.tool_name, input=tool_input)

    def _run_signature(self) -> inspect.Signature:
        """The body's signature, read once per body (every delivery binds its arguments)."""
        run = self.run
        cached: tuple[Any, inspect.Signature] | None = self.__dict__.get("_governance_signature")
        if cached is None or cached[0] != run:
            cached = (run, inspect.signature(run))
            self.__dict__["_governance_signature"] = cached
        return cached[1]

    def action_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        """:meth:`build_action`, with any failure turned into a clear :class:`ActionDenied`."""
        try:
            return self.build_action(args, kwargs)
        except ActionDenied:
            raise
        except ValidationError as exc:
            raise ActionDenied(
                f"invalid action for task {self.name!r}: {_validation_text(exc)}"
            ) from None
        except Exception as exc:
            raise ActionDenied(
                f"could not describe the action of task {self.name!r} ({type(exc).__name__}: {exc})"
            ) from None

    def prepare(self, action: Action, tenant: TenantPolicy) -> None:
        """Check the input against the tenant's policy before admission; raise ActionDenied."""

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``self.retry()``, governed: the attempt settles first, then the task is
        published again (its retry recorded in the ledger, a long wait parked) by the worker.
        ``max_retries`` (the task's, or this call's) is honoured as Celery does."""
        request = self.request
        if request.called_directly or not is_governed(self):
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries + 1 > limit:
            if exc is not None:
                # The task gave up: the tenant's retry policy must not retry it all the same.
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(exc, RETRIES_EXHAUSTED, True)
                raise exc
            raise self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}]: max_retries {limit} reached"
            )
        delay_s: float | None = countdown
        if eta is not None:
            delay_s = max(0.0, eta.timestamp() - datetime.now(eta.tzinfo).timestamp())
        if delay_s is None:
            delay_s = float(self.default_retry_delay or 0)
        raise GovernedRetry(exc, delay_s)

    def start_delivery(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Delivery:
        """Begin this delivery before Celery calls the body (``task_prerun``): its admission
        is written when the policy alone allows it, so that round trip overlaps Celery's own
        (see :mod:`governance.integration.worker.overlap`)."""
        life = Delivery(self, args, kwargs)
        life.start_admission()
        return life

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not is_governed(self):
            return super().__call__(*args, **kwargs)
        life = started_delivery(self) or Delivery(self, args, kwargs)
        try:
            return life.run()
        except Acknowledged as acknowledged:
            durable = acknowledged.durable
        life.runtime.garbage.noted()
        if durable and life.headers is not None and life.runtime.durable_on:
            # The worker's main process acknowledges once the record is durable (durable_ack).
            raise AckWhenDurable(life.headers.context.tenant, life.task_id)
        raise Ignore()


class GovernedLLMTask(GovernedTask):
    """A governed task calling an LLM: its keyword arguments are an ``LLMCall`` (provider,
    model, messages, max_tokens); admission reserves the call's estimate."""

    def build_action(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        if args:
            raise ActionDenied(f"LLM task {self.name!r} takes keyword arguments only")
        return LLMCall.model_validate(kwargs)
