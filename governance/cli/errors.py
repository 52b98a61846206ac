"""govctl's exit codes, and how an exception becomes one (with a one-line message, no traceback).

Exceptions are recognised by class without importing their modules: an instance of a class can
only exist once its module was imported, so ``govctl --help`` and ``govctl policy check`` never
import Celery or redis just to be able to classify an error.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    """What ``govctl`` exits with (see ``govctl --help``)."""

    OK = 0
    REFUSED = 1  # refused, denied, not found, or a submitted task did not succeed
    USAGE = 2  # a bad command line (Typer/Click's own code)
    STORE_UNAVAILABLE = 3  # the state Redis (or the broker) could not be reached
    AUDIT_BROKEN = 4  # `audit verify` found a broken link in the hash chain
    INVALID_CONFIG = 5  # the policy file (or GOVERNANCE_* settings, or GOVERNANCE_APP) is invalid


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 refused, denied or not found; 2 usage error; "
    "3 state store (Redis) or broker unavailable; 4 audit verification failed; "
    "5 invalid policy file or settings."
)


class CliError(Exception):
    """A failure govctl reports as ``error: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


#: (module, class name, exit code, message prefix), most specific first.
_KNOWN: tuple[tuple[str, str, ExitCode, str], ...] = (
    ("governance.store.errors", "StoreUnavailable", ExitCode.STORE_UNAVAILABLE, ""),
    ("governance.policy.loader", "ConfigError", ExitCode.INVALID_CONFIG, ""),
    ("governance.integration.errors", "ApprovalRefused", ExitCode.REFUSED, ""),
    ("governance.integration.errors", "ActionDenied", ExitCode.REFUSED, "denied: "),
    ("governance.integration.errors", "GovernanceError", ExitCode.REFUSED, ""),
    ("redis.exceptions", "RedisError", ExitCode.STORE_UNAVAILABLE, "redis unavailable: "),
    ("kombu.exceptions", "OperationalError", ExitCode.STORE_UNAVAILABLE, "broker unavailable: "),
)


def classify(exc: BaseException) -> tuple[ExitCode, list[str]] | None:
    """The exit code and the message lines for a known failure; None for a bug.

    An unknown exception caused by an unreachable Redis or broker (Celery wraps some of those,
    e.g. in a RuntimeError) counts as that cause.
    """
    if isinstance(exc, CliError):
        return exc.code, exc.message.splitlines() or [""]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        known = _known(current)
        if known is not None and (current is exc or known[0] is ExitCode.STORE_UNAVAILABLE):
            return known
        current = current.__cause__ or current.__context__
    return None


def _known(exc: BaseException) -> tuple[ExitCode, list[str]] | None:
    for module_name, class_name, code, prefix in _KNOWN:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            lines = str(exc).splitlines() or [class_name]
            return code, [prefix + lines[0], *lines[1:]]
    return None
