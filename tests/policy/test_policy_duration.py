"""Durations in the config: units, bare seconds, and clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from governance.policy import parse_duration
from governance.policy.duration import format_duration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1.5s", timedelta(milliseconds=1500)),
        (" 10 s ", timedelta(seconds=10)),
        ("45", timedelta(seconds=45)),
        (45, timedelta(seconds=45)),
        (0.25, timedelta(milliseconds=250)),
        (timedelta(minutes=1), timedelta(minutes=1)),
    ],
)
def test_parse_duration(value: object, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["", "soon", "5 minutes", "1w", "-5s", "1h30m", True, None, -3])
def test_bad_durations_are_rejected_clearly(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "shortest"),
    [
        ("500ms", "500ms"),
        ("30s", "30s"),
        ("5m", "5m"),
        ("24h", "1d"),
        ("90m", "90m"),
        ("1.5s", "1500ms"),
    ],
)
def test_format_duration_gives_the_shortest_exact_form(text: str, shortest: str) -> None:
    assert format_duration(parse_duration(text)) == shortest
    assert parse_duration(shortest) == parse_duration(text)
