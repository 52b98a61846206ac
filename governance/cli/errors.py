"""govctl's exit codes, and how an exception becomes one (with a one-line message, no traceback).

Exceptions are recognised by class without importing their modules: an instance of a class can
only exist once its module was imported, so ``govctl --help`` and ``govctl policy check`` never
import Celery or redis just to be able to classify an error.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    """What ``govctl`` exits with (the table in ``govctl --help`` and the README)."""

    OK = 0
    REFUSED = 1  # refused, denied, not found, unknown tenant, invalid input; --wait: not SUCCESS
    USAGE = 2  # a bad command line (Typer/Click's own code)
    STORE_UNAVAILABLE = 3  # the state Redis (GOVERNANCE_STATE_REDIS_URL) could not be reached
    AUDIT_BROKEN = 4  # `audit verify` found a broken link in the hash chain
    INVALID_CONFIG = 5  # the policy file, GOVERNANCE_* settings or GOVERNANCE_APP is invalid
    BROKER_UNAVAILABLE = 6  # the Celery broker (GOVERNANCE_BROKER_URL) could not be reached


#: ``govctl``'s exit codes, one line each: ``govctl --help``, the module doc and the README's
#: table say the same (a test checks the README against this).
EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.REFUSED: "refused, denied or not found: an unknown task, tenant, tool or grant, "
    "invalid input, a decision the rules forbid; with `--wait`, a task that did not succeed "
    "(denied, failed, rejected, still held, or not done in time)",
    ExitCode.USAGE: "usage error: a bad command line (unknown option, missing argument)",
    ExitCode.STORE_UNAVAILABLE: "the state Redis (`GOVERNANCE_STATE_REDIS_URL`) is unreachable",
    ExitCode.AUDIT_BROKEN: "audit verification failed (the broken entry is named)",
    ExitCode.INVALID_CONFIG: "invalid configuration: the policy file, `GOVERNANCE_*` settings "
    "or `GOVERNANCE_APP`",
    ExitCode.BROKER_UNAVAILABLE: "the Celery broker (`GOVERNANCE_BROKER_URL`) is unreachable",
}


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
    ("kombu.exceptions", "OperationalError", ExitCode.BROKER_UNAVAILABLE, "broker unavailable: "),
)


_UNREACHABLE = (ExitCode.STORE_UNAVAILABLE, ExitCode.BROKER_UNAVAILABLE)


def classify(exc: BaseException) -> tuple[ExitCode, list[str]] | None:
    """The exit code and the message lines for a known failure; None for a bug.

    An unknown exception caused by an unreachable Redis or broker (Celery wraps some of those,
    e.g. in a RuntimeError) counts as that cause. A file the command could not read or write
    (missing directory, no permission) is refused with its path.
    """
    if isinstance(exc, CliError):
        return exc.code, exc.message.splitlines() or [""]
    if isinstance(exc, OSError) and exc.filename is not None:
        # A file or directory the command was given cannot be read or written.
        return ExitCode.REFUSED, [f"{exc.strerror or exc}: {exc.filename}"]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        known = _known(current)
        if known is not None and (current is exc or known[0] in _UNREACHABLE):
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
