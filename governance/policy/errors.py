"""How an action failed, classified so the retry policy knows whether and when to try again.

`ActionError` keeps its fields in `args` and implements `__reduce__`, so it survives both pickling
and Celery's JSON exception encoding (which rebuilds an exception as `cls(*args)`).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from http import HTTPStatus
from typing import Any


class ErrorKind(StrEnum):
    """permanent: never retry; transient: retry with backoff; rate_limited: wait, then retry."""

    permanent = "permanent"
    transient = "transient"
    rate_limited = "rate_limited"


class ActionError(Exception):
    """A classified failure of a tool or LLM call.

    ``outcome_unknown`` says the request reached the callee and no answer tells what it did: a
    read timeout, a connection lost after sending, a gateway that timed out. The callee may have
    done the work (and an LLM provider billed it), so the attempt's whole reservation is counted
    as spent when it settles, never given back.
    """

    def __init__(
        self,
        message: str,
        kind: ErrorKind | str,
        retry_after_ms: int | None = None,
        status: int | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        kind = ErrorKind(kind)
        if retry_after_ms is not None and retry_after_ms < 0:
            raise ValueError(f"retry_after_ms must be >= 0 (got {retry_after_ms})")
        # args hold plain values only, so JSON result backends can carry them and call cls(*args).
        super().__init__(message, kind.value, retry_after_ms, status, outcome_unknown)
        self.message = message
        self.kind = kind
        self.retry_after_ms = retry_after_ms
        self.status = status
        self.outcome_unknown = bool(outcome_unknown)

    @classmethod
    def permanent(cls, message: str, *, status: int | None = None) -> ActionError:
        """A failure that will not go away by trying again (bad input, forbidden, not found)."""
        return cls(message, ErrorKind.permanent, status=status)

    @classmethod
    def transient(
        cls, message: str, *, status: int | None = None, outcome_unknown: bool = False
    ) -> ActionError:
        """A failure that may go away (timeout, connection reset, 5xx); ``outcome_unknown``
        when the request was sent and may have been carried out (see the class)."""
        return cls(message, ErrorKind.transient, status=status, outcome_unknown=outcome_unknown)

    @classmethod
    def rate_limited(
        cls, message: str, retry_after_ms: int | None = None, *, status: int | None = None
    ) -> ActionError:
        """The callee asked us to slow down, optionally saying for how long."""
        return cls(message, ErrorKind.rate_limited, retry_after_ms, status)

    @property
    def retryable(self) -> bool:
        """Whether a retry policy may try again at all."""
        return self.kind is not ErrorKind.permanent

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            self.__class__,
            (self.message, self.kind.value, self.retry_after_ms, self.status, self.outcome_unknown),
        )

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = ""
        if self.retry_after_ms is not None:
            extra += f", retry_after_ms={self.retry_after_ms}"
        if self.status is not None:
            extra += f", status={self.status}"
        if self.outcome_unknown:
            extra += ", outcome_unknown=True"
        return f"ActionError({self.message!r}, {self.kind.value!r}{extra})"


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime | None = None) -> int | None:
    """Milliseconds to wait according to a Retry-After header, or None if absent or garbage.

    Accepts delta-seconds (also with decimals, "1.5", which some APIs send) and HTTP dates; a date
    in the past means 0. Fractions of a millisecond round up, so we never come back early.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return math.ceil(float(text) * 1000)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    delta_ms = (when - reference).total_seconds() * 1000
    return max(0, math.ceil(delta_ms))


#: Statuses of a proxy that forwarded the request and got no valid answer in time.
GATEWAY_FAILURES = frozenset({502, 504, 524})


def _status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def classify_http_status(
    status: int, retry_after: str | None = None, now: datetime | None = None
) -> ActionError | None:
    """Turn an HTTP response status (and Retry-After header) into an ActionError, or None if ok.

    429 is rate_limited; 503 with a usable Retry-After too, since the server said when to come
    back; other 5xx and 408 are transient; other 4xx are permanent; 1xx-3xx are not errors.
    A gateway's failure (502, 504, Cloudflare's 524) is transient with ``outcome_unknown``: a
    proxy got no valid answer from the server behind it, which may have done the work.
    """
    if not 100 <= status <= 599:
        raise ValueError(f"not an HTTP status code: {status}")
    if status < 400:
        return None
    text = _status_text(status)
    wait_ms = parse_retry_after(retry_after, now)
    if status == 429 or (status == 503 and wait_ms is not None):
        suffix = f" (retry after {wait_ms} ms)" if wait_ms is not None else ""
        return ActionError.rate_limited(text + suffix, wait_ms, status=status)
    if status in GATEWAY_FAILURES:
        return ActionError.transient(text, status=status, outcome_unknown=True)
    if status >= 500 or status == 408:
        return ActionError.transient(text, status=status)
    return ActionError.permanent(text, status=status)
