"""The governance headers of a task message: its context, and what the message is on its way.

The context travels in the message headers (never in the arguments), so a governed task keeps
its ordinary signature, and the worker, which decides authoritatively, reads and validates it
before anything else. A missing or malformed context is a denial with a reason. The attempt is
Celery's own ``retries`` field, so ``self.request.retries`` and ``max_retries`` mean what Celery
users expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from governance.policy.context import ActionContext
from governance.policy.signing import call_hash

CONTEXT = "gov_context"
#: Set by a publisher that recorded the task in the ledger (with its message): the worker then
#: need not send the message along with its admission.
LEDGER = "gov_ledger"
#: The token of a message handed on from the wait list: its delivery takes the slot kept for it.
HANDOFF = "gov_handoff"
#: "count,since_ms": how often the message was sent back while the state store was down.
OUTAGE = "gov_outage"
#: The reviewers' signed decisions that release an approval-tier call (JSON list).
APPROVALS = "gov_approvals"

#: Headers that describe one trip of the message, not the task: dropped when it is published again.
TRANSIENT = (HANDOFF, OUTAGE)


class HeaderError(ValueError):
    """The message's governance headers are missing or malformed; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GovernanceHeaders:
    """What a governed task message carries besides its arguments."""

    context: ActionContext
    attempt: int = 0
    handoff: str | None = None
    outage: tuple[int, int] | None = None
    approvals: tuple[dict[str, Any], ...] = ()
    ledgered: bool = False

    def to_headers(self) -> dict[str, Any]:
        """The headers a publisher sends (the attempt goes in Celery's ``retries``)."""
        headers: dict[str, Any] = {CONTEXT: context_json(self.context)}
        if self.approvals:
            headers[APPROVALS] = json.dumps(list(self.approvals), separators=(",", ":"))
        return headers


def context_json(context: ActionContext) -> str:
    return context.model_dump_json(exclude_none=True)


def header_value(request: Any, name: str) -> Any:
    """A custom header of a Celery request (merged into the request; also in ``.headers``)."""
    headers = getattr(request, "headers", None) or {}
    if name in headers:
        return headers[name]
    return request.get(name) if hasattr(request, "get") else getattr(request, name, None)


def _outage(raw: Any) -> tuple[int, int] | None:
    if not raw:
        return None
    try:
        count, since = (int(x) for x in str(raw).split(","))
    except ValueError:
        raise HeaderError(f"malformed governance header {OUTAGE}: {raw!r}") from None
    return count, since


def _approvals(raw: Any) -> tuple[dict[str, Any], ...]:
    if not raw:
        return ()
    try:
        value = json.loads(raw) if isinstance(raw, str | bytes) else raw
    except ValueError:
        raise HeaderError(f"malformed governance header {APPROVALS}: not JSON") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise HeaderError(f"malformed governance header {APPROVALS}: not a list of decisions")
    return tuple(value)


@lru_cache(maxsize=4096)
def _context_from_json(raw: str | bytes) -> ActionContext:
    # Contexts are immutable: one header text is validated once per process, not per message
    # (a run's steps all carry the same text); an invalid one raises, and is not cached.
    return ActionContext.model_validate_json(raw)


def read_context(raw: Any) -> ActionContext:
    """Validate a context header; :class:`HeaderError` says what is wrong."""
    try:
        if isinstance(raw, str | bytes):
            return _context_from_json(raw)
        return ActionContext.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'context'}: {err['msg']}"
            for err in exc.errors()
        )
        raise HeaderError(f"malformed governance context: {problems}") from None


def read_headers(request: Any) -> GovernanceHeaders:
    """The governance headers of ``request``, validated; :class:`HeaderError` says what is wrong."""
    raw = header_value(request, CONTEXT)
    if raw is None:
        raise HeaderError(
            f"no governance context: the message has no {CONTEXT} header (publish governed "
            "tasks inside `with governance_context(...)`, or from a governed task's body)"
        )
    retries = getattr(request, "retries", 0) or 0
    if not isinstance(retries, int) or retries < 0:
        raise HeaderError(f"malformed retries field: {retries!r}")
    handoff = header_value(request, HANDOFF)
    return GovernanceHeaders(
        context=read_context(raw),
        attempt=retries,
        handoff=str(handoff) if handoff else None,
        outage=_outage(header_value(request, OUTAGE)),
        approvals=_approvals(header_value(request, APPROVALS)),
        ledgered=bool(header_value(request, LEDGER)),
    )


def context_dict(context: ActionContext) -> dict[str, Any]:
    """The context as a decision's call hash covers it (exactly as the message carries it)."""
    value: dict[str, Any] = json.loads(context_json(context))
    return value


def message_call(task_name: str, args: Any, kwargs: Any, context: ActionContext) -> str:
    """The call hash of a message: what reviewers' signatures must be over (the task, its
    arguments and its context, see ``signing.call_hash``)."""
    return call_hash(task_name, list(args), dict(kwargs), context_dict(context))
