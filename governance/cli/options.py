"""Option values several govctl commands parse the same way."""

from __future__ import annotations

from datetime import timedelta

import typer


def positive_duration(value: str, option: str, what: str) -> timedelta:
    """``value`` (``90s``, ``15m``, ``1h``, ...) as a duration longer than 0, or a usage error
    naming ``option`` (``what`` must last longer than 0: "a grant", "an override")."""
    from governance.policy.duration import parse_duration

    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if duration <= timedelta(0):
        raise typer.BadParameter(f"{what} must last longer than 0", param_hint=option)
    return duration
