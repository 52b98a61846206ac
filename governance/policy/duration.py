"""Human-friendly durations in the config: "500ms", "30s", "5m", "1h", "2d" or bare seconds."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> timedelta:
    """Parse a duration; raise ValueError naming the accepted forms if `value` is not one."""
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, int | float):
        result = timedelta(seconds=value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        number, unit = match.groups()
        result = timedelta(seconds=float(number) * _UNIT_SECONDS[unit])
    else:
        raise ValueError(
            f"not a duration: {value!r} (expected e.g. '500ms', '30s', '5m', '1h', '2d' "
            "or a number of seconds)"
        )
    if result < timedelta(0):
        raise ValueError(f"a duration must not be negative (got {value!r})")
    return result


def format_duration(value: timedelta) -> str:
    """The shortest exact form parse_duration reads back, e.g. "1d" for 24 h, "1500ms" for 1.5 s."""
    ms = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A config field holding a non-negative duration."""

PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""A config field holding a duration longer than zero."""
