"""Expiring grants: a named agent may take a named action (or class) until a point in time.

A grant both admits an action outside the tenant's allow-list and lets it run without approval
(seed 004's AllowWithGrant). It comes from the config or from the store, where reviewers add them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from governance.policy.context import Identifier


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class Grant(BaseModel):
    """Permission for `agent` to take `action` (a tool or provider name, or a side-effect class)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent: Identifier
    action: Annotated[str, Field(min_length=1, max_length=128)]
    until: Annotated[AwareDatetime, AfterValidator(_to_utc)]
    granted_by: str | None = None
    reason: str | None = None

    def matches(
        self, agent: str, action_name: str, action_class: str | None, now: datetime
    ) -> bool:
        """Whether this grant covers the action right `now` (it expires at `until`, exclusive)."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if agent != self.agent or self.until <= now:
            return False
        return self.action == action_name or (
            action_class is not None and self.action == action_class
        )
