"""The governance headers of a task message: its context and its attempt and deferral counters.

The context travels in the message headers (never in the arguments), so plain
``apply_async(headers=...)`` works, and the worker, which decides authoritatively, reads and
validates it before anything else. A missing or malformed context is a denial with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from governance.policy.context import ActionContext

CONTEXT = "gov_context"
ATTEMPT = "gov_attempt"
DEFERRALS = "gov_deferrals"
RELEASE_TOKEN = "gov_release"


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
    deferrals: int = 0
    release_token: str | None = None

    def to_headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            CONTEXT: self.context.model_dump_json(exclude_none=True),
            ATTEMPT: self.attempt,
            DEFERRALS: self.deferrals,
        }
        if self.release_token:
            headers[RELEASE_TOKEN] = self.release_token
        return headers

    def next_attempt(self) -> GovernanceHeaders:
        """For a retry after a failure: a new attempt, and no release token (it was used)."""
        return replace(self, attempt=self.attempt + 1, release_token=None)

    def deferred(self) -> GovernanceHeaders:
        """For a re-offer after a deferral: the same attempt, one more deferral."""
        return replace(self, deferrals=self.deferrals + 1)


def header_value(request: Any, name: str) -> Any:
    """A custom header of a Celery request (merged into the request; also in ``.headers``)."""
    headers = getattr(request, "headers", None) or {}
    if name in headers:
        return headers[name]
    return request.get(name) if hasattr(request, "get") else getattr(request, name, None)


def _counter(request: Any, name: str) -> int:
    raw = header_value(request, name)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise HeaderError(
            f"malformed governance header {name}: {raw!r} is not an integer"
        ) from None
    if value < 0:
        raise HeaderError(f"malformed governance header {name}: {value} is negative")
    return value


def read_headers(request: Any) -> GovernanceHeaders:
    """The governance headers of ``request``, validated; :class:`HeaderError` says what is wrong."""
    raw = header_value(request, CONTEXT)
    if raw is None:
        raise HeaderError(
            f"no governance context: the message has no {CONTEXT} header (send governed tasks "
            "with governance.integration.submit, or apply_async(headers=...))"
        )
    try:
        if isinstance(raw, str | bytes):
            context = ActionContext.model_validate_json(raw)
        else:
            context = ActionContext.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'context'}: {err['msg']}"
            for err in exc.errors()
        )
        raise HeaderError(f"malformed governance context: {problems}") from None
    token = header_value(request, RELEASE_TOKEN)
    return GovernanceHeaders(
        context=context,
        attempt=_counter(request, ATTEMPT),
        deferrals=_counter(request, DEFERRALS),
        release_token=str(token) if token else None,
    )
