"""The Celery task base class that governs every task built on it.

Subclasses say what action a call is (:meth:`GovernedTask.build_action`) and may validate its
input against the tenant's policy (:meth:`GovernedTask.prepare`); the base class runs the life
of the task (:mod:`governance.integration.lifecycle`) around the body on every delivery.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from governance.integration.errors import GOVERNANCE_ERRORS
from governance.integration.lifecycle import TaskLife
from governance.policy.actions import Action
from governance.policy.tenant import TenantPolicy


class GovernedTask(Task):  # type: ignore[misc]
    """A task whose every delivery is authorized, admitted, settled and audited."""

    #: Governance outcomes are expected: workers log them without a traceback.
    throws = GOVERNANCE_ERRORS
    #: Shows governance failures in Flower as DENIED/REJECTED instead of FAILURE.
    Request = "governance.integration.request:GovernedRequest"
    #: A worker killed mid-task must not lose the message: acknowledge only after it ran.
    acks_late = True
    reject_on_worker_lost = True

    def build_action(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        """The action this call takes (a ToolCall or an LLMCall); raise ActionDenied if none."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_action()")

    def prepare(self, action: Action, tenant: TenantPolicy) -> None:
        """Check the input against the tenant's policy before admission; raise ActionDenied."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return TaskLife(self, args, kwargs).run()
