"""Which tasks are governed: those of a ``GovernedTask`` class, except Celery's own.

``Celery(task_cls=GovernedTask)`` makes every task of the app a ``GovernedTask``, Celery's
built-in tasks (``celery.chord_unlock``, ``celery.backend_cleanup``, the canvas helpers) too;
those carry no agent action, so they run as plain Celery tasks.
"""

from __future__ import annotations

from typing import Any

#: The name prefix of Celery's built-in tasks.
CELERY_BUILTIN_PREFIX = "celery."


def is_governed(task: Any) -> bool:
    """Whether publishing and running ``task`` goes through governance."""
    if not getattr(task, "governed", False):
        return False
    name = getattr(task, "name", None) or ""
    return not name.startswith(CELERY_BUILTIN_PREFIX)
