"""ActionError (pickling, kinds), Retry-After parsing and HTTP status classification."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from governance.policy import ActionError, ErrorKind, classify_http_status, parse_retry_after

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "error",
    [
        ActionError.permanent("bad request"),
        ActionError.transient("timeout", status=504),
        ActionError.rate_limited("slow down", 2500, status=429),
        ActionError.rate_limited("slow down"),
        ActionError.transient("read timed out", outcome_unknown=True),
    ],
)
def test_action_error_survives_pickle(error: ActionError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is ActionError
    assert (back.message, back.kind, back.retry_after_ms, back.status, back.outcome_unknown) == (
        error.message,
        error.kind,
        error.retry_after_ms,
        error.status,
        error.outcome_unknown,
    )
    assert str(back) == error.message


def test_action_error_rebuilds_from_its_args_like_celery_json_does() -> None:
    error = ActionError.rate_limited("429", 1200, status=429)
    back = ActionError(*error.args)
    assert (back.kind, back.retry_after_ms, back.status) == (ErrorKind.rate_limited, 1200, 429)
    assert not back.outcome_unknown
    unknown = ActionError(*ActionError.transient("timed out", outcome_unknown=True).args)
    assert unknown.outcome_unknown
    assert "outcome_unknown=True" in repr(unknown)


def test_outcome_unknown_only_when_said() -> None:
    assert not ActionError.transient("refused").outcome_unknown
    assert not ActionError.permanent("bad").outcome_unknown
    assert ActionError.transient("read timeout", outcome_unknown=True).outcome_unknown


def test_classmethods_set_the_kind() -> None:
    assert ActionError.permanent("x").kind is ErrorKind.permanent
    assert ActionError.transient("x").kind is ErrorKind.transient
    assert ActionError.rate_limited("x", 5).kind is ErrorKind.rate_limited
    assert not ActionError.permanent("x").retryable
    assert ActionError.transient("x").retryable


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="fatal"):
        ActionError("x", "fatal")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", 2000), ("0", 0), ("1.5", 1500), (" 120 ", 120_000), ("0.0004", 1)],
)
def test_retry_after_in_seconds(value: str, expected: int) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_as_http_date() -> None:
    header = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert header.endswith("GMT")
    assert parse_retry_after(header, NOW) == 30_000


def test_retry_after_as_fixed_http_date_string() -> None:
    assert parse_retry_after("Sat, 01 Mar 2025 12:01:00 GMT", NOW) == 60_000


def test_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", NOW) == 0


@pytest.mark.parametrize("value", [None, "", "soon", "-1", "1e3", "inf", "nan", "Mon, 99 Foo"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304])
def test_success_and_redirect_statuses_are_not_errors(status: int) -> None:
    assert classify_http_status(status) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ErrorKind.permanent),
        (401, ErrorKind.permanent),
        (404, ErrorKind.permanent),
        (408, ErrorKind.transient),
        (500, ErrorKind.transient),
        (502, ErrorKind.transient),
        (503, ErrorKind.transient),
        (504, ErrorKind.transient),
    ],
)
def test_error_statuses_are_classified(status: int, kind: ErrorKind) -> None:
    error = classify_http_status(status)
    assert error is not None
    assert error.kind is kind
    assert error.status == status
    assert str(status) in error.message


@pytest.mark.parametrize("status", [502, 504, 524])
def test_a_gateway_failure_leaves_the_outcome_unknown(status: int) -> None:
    # The proxy forwarded the request; the server behind it may have done the work.
    error = classify_http_status(status)
    assert error is not None
    assert error.outcome_unknown


@pytest.mark.parametrize("status", [400, 408, 429, 500, 503])
def test_an_answer_of_the_server_itself_is_a_known_outcome(status: int) -> None:
    error = classify_http_status(status)
    assert error is not None
    assert not error.outcome_unknown


def test_429_is_rate_limited_with_retry_after() -> None:
    error = classify_http_status(429, "3", NOW)
    assert error is not None
    assert (error.kind, error.retry_after_ms) == (ErrorKind.rate_limited, 3000)
    assert "429" in error.message


def test_429_without_retry_after_is_rate_limited_without_a_wait() -> None:
    error = classify_http_status(429)
    assert error is not None
    assert (error.kind, error.retry_after_ms) == (ErrorKind.rate_limited, None)


def test_503_with_retry_after_is_rate_limited() -> None:
    error = classify_http_status(503, "Sat, 01 Mar 2025 12:00:10 GMT", NOW)
    assert error is not None
    assert (error.kind, error.retry_after_ms) == (ErrorKind.rate_limited, 10_000)
    assert "503" in error.message


def test_503_with_unusable_retry_after_is_transient() -> None:
    error = classify_http_status(503, "later")
    assert error is not None
    assert error.kind is ErrorKind.transient


def test_out_of_range_status_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not an HTTP status"):
        classify_http_status(42)
