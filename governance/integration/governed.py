"""Which tasks are governed: those of a ``GovernedTask`` class, except Celery's own.

``Celery(task_cls=GovernedTask)`` makes every task of the app a ``GovernedTask``, Celery's
built-in tasks (``celery.chord_unlock``, ``celery.backend_cleanup``, the canvas helpers) too;
those carry no agent action, so they run as plain Celery tasks.
"""

from __future__ import annotations

from typing import Any, Protocol

from governance.policy.actions import Action
from governance.policy.tenant import TenantPolicy

#: The name prefix of Celery's built-in tasks.
CELERY_BUILTIN_PREFIX = "celery."


def is_governed(task: Any) -> bool:
    """Whether publishing and running ``task`` goes through governance."""
    if not getattr(task, "governed", False):
        return False
    name = getattr(task, "name", None) or ""
    return not name.startswith(CELERY_BUILTIN_PREFIX)


class Governable(Protocol):
    """What the publisher and the worker ask of a governed task (``GovernedTask`` is one):
    the action a call takes, and the tenant's input checks before admission."""

    name: str

    def action_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Action:
        """The action of this call; :class:`ActionDenied` when it cannot be described."""
        ...

    def prepare(self, action: Action, tenant: TenantPolicy) -> None:
        """Check the input against the tenant's policy; raise :class:`ActionDenied`."""
        ...
