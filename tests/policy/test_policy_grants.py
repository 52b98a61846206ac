"""Grants: admit an action outside the allow-list, lift approval to act_auto, expire on time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from governance.policy import ActionContext, Grant, Outcome, Policy, Tier, ToolCall

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def grant(action: str = "delete_file", agent: str = "ops-bot", **delta: float) -> Grant:
    return Grant(agent=agent, action=action, until=NOW + timedelta(**delta or {"hours": 1}))


def test_active_grant_allows_a_tool_outside_the_allow_list(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy()
    action = ToolCall(tool="delete_file")
    assert policy.authorize(ctx("ops-bot"), action, now=NOW).outcome is Outcome.deny
    decision = policy.authorize(ctx("ops-bot"), action, grants=[grant()], now=NOW)
    assert decision.outcome is Outcome.allow
    assert decision.granted
    assert (decision.tier, decision.rule) == (Tier.act_auto, "grant")


def test_grant_lifts_act_with_approval_to_act_auto(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(defaults={"tiers": {"actions": {"process.exec": "act_with_approval"}}})
    shell = ToolCall(tool="shell")
    assert policy.authorize(ctx("ops-bot"), shell, now=NOW).outcome is Outcome.hold
    decision = policy.authorize(ctx("ops-bot"), shell, grants=[grant("shell")], now=NOW)
    assert (decision.outcome, decision.tier, decision.rule) == (
        Outcome.allow,
        Tier.act_auto,
        "grant",
    )


def test_grant_by_side_effect_class(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(
        ctx("ops-bot"), ToolCall(tool="delete_file"), grants=[grant("fs.delete")], now=NOW
    )
    assert decision.allowed
    assert decision.granted


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1)])
def test_expired_grant_no_longer_allows(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext], delta: timedelta
) -> None:
    expired = Grant(agent="ops-bot", action="delete_file", until=NOW + delta)
    decision = make_policy().authorize(
        ctx("ops-bot"), ToolCall(tool="delete_file"), grants=[expired], now=NOW
    )
    assert decision.outcome is Outcome.deny
    assert not decision.granted


def test_grant_for_another_agent_does_not_apply(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(
        ctx("other-bot"), ToolCall(tool="delete_file"), grants=[grant()], now=NOW
    )
    assert decision.outcome is Outcome.deny


def test_grants_from_the_config_apply_until_they_expire(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        acme={
            "grants": [
                {"agent": "ops-bot", "action": "delete_file", "until": "2025-06-01T13:00:00Z"}
            ]
        }
    )
    action = ToolCall(tool="delete_file")
    assert policy.authorize(ctx("ops-bot"), action, now=NOW).granted
    later = datetime(2025, 6, 1, 13, 0, tzinfo=UTC)
    assert policy.authorize(ctx("ops-bot"), action, now=later).outcome is Outcome.deny


def test_grant_does_not_override_a_deny_rule(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"deny": [{"action": "fs.delete", "reason": "never"}]})
    decision = policy.authorize(
        ctx("ops-bot"), ToolCall(tool="delete_file"), grants=[grant()], now=NOW
    )
    assert decision.outcome is Outcome.deny


def test_grant_until_must_be_timezone_aware_and_is_stored_in_utc() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Grant(agent="a", action="echo", until=datetime(2025, 1, 1))
    plus_two = timezone(timedelta(hours=2))
    g = Grant(agent="a", action="echo", until=datetime(2025, 1, 1, 2, 0, tzinfo=plus_two))
    assert g.until == datetime(2025, 1, 1, 0, 0, tzinfo=UTC)
    assert g.until.tzinfo is UTC


def test_grant_matches_is_strict_about_until() -> None:
    g = grant("echo", hours=0, seconds=1)
    assert g.matches("ops-bot", "echo", "compute", NOW)
    assert not g.matches("ops-bot", "echo", "compute", NOW + timedelta(seconds=1))
