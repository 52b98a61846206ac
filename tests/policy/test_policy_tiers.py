"""Tier resolution: five levels, most specific first; name before class; defaults' maps merged."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from governance.policy import ActionContext, LLMCall, Outcome, Policy, Tier, TierLevel, ToolCall

FULL_TIERS: dict[str, Any] = {
    "defaults": {"default": "act_with_approval"},
    "tenant": {
        "default": "suggest",
        "actions": {"http_get": "act_with_approval"},
        "agents": {"researcher": "shadow"},
        "agent_actions": {"researcher": {"http_get": "act_auto"}},
    },
}

# Each row removes one more of the most specific entries; the next level must take over.
LEVELS = [
    (
        [],
        Tier.act_auto,
        TierLevel.agent_action,
        "tenants.acme.tiers.agent_actions.researcher.http_get",
    ),
    (["agent_actions"], Tier.shadow, TierLevel.agent, "tenants.acme.tiers.agents.researcher"),
    (
        ["agent_actions", "agents"],
        Tier.act_with_approval,
        TierLevel.action,
        "tenants.acme.tiers.actions.http_get",
    ),
    (
        ["agent_actions", "agents", "actions"],
        Tier.suggest,
        TierLevel.tenant_default,
        "tenants.acme.tiers.default",
    ),
    (
        ["agent_actions", "agents", "actions", "default"],
        Tier.act_with_approval,
        TierLevel.global_default,
        "defaults.tiers.default",
    ),
]


@pytest.mark.parametrize(("removed", "tier", "level", "rule"), LEVELS)
def test_tier_precedence_levels(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    removed: list[str],
    tier: Tier,
    level: TierLevel,
    rule: str,
) -> None:
    tenant_tiers = copy.deepcopy(FULL_TIERS["tenant"])
    for key in removed:
        del tenant_tiers[key]
    policy = make_policy(acme={"tiers": tenant_tiers}, defaults={"tiers": FULL_TIERS["defaults"]})
    decision = policy.authorize(ctx("researcher"), ToolCall(tool="http_get"))
    assert (decision.tier, decision.tier_level, decision.rule) == (tier, level, rule)
    assert rule in decision.reason


def test_without_any_tier_setting_the_builtin_default_is_act_auto(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(ctx("researcher"), ToolCall(tool="http_get"))
    assert decision.tier is Tier.act_auto
    assert decision.tier_level is TierLevel.global_default
    assert decision.rule == "built-in default (act_auto)"


def test_other_agents_skip_the_agent_levels(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"tiers": FULL_TIERS["tenant"]})
    decision = policy.authorize(ctx("writer"), ToolCall(tool="http_get"))
    assert decision.rule == "tenants.acme.tiers.actions.http_get"


@pytest.mark.parametrize(
    ("tier", "outcome"),
    [
        ("act_auto", Outcome.allow),
        ("act_with_approval", Outcome.hold),
        ("suggest", Outcome.suggest),
        ("shadow", Outcome.shadow),
    ],
)
def test_tier_gives_the_outcome(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    tier: str,
    outcome: Outcome,
) -> None:
    decision = make_policy(acme={"tiers": {"default": tier}}).authorize(
        ctx(), ToolCall(tool="echo")
    )
    assert decision.outcome is outcome
    assert decision.allowed is (outcome is Outcome.allow)


@pytest.mark.parametrize("section", ["agent_actions", "actions"])
def test_name_wins_over_class_within_a_level(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext], section: str
) -> None:
    entries = {"network.read": "shadow", "http_get": "act_auto"}
    tiers: dict[str, Any] = (
        {"agent_actions": {"researcher": entries}}
        if section == "agent_actions"
        else {"actions": entries}
    )
    prefix = (
        "tenants.acme.tiers.agent_actions.researcher"
        if section == "agent_actions"
        else "tenants.acme.tiers.actions"
    )
    by_name = make_policy(acme={"tiers": tiers}).authorize(
        ctx("researcher"), ToolCall(tool="http_get")
    )
    assert (by_name.tier, by_name.rule) == (Tier.act_auto, f"{prefix}.http_get")

    del entries["http_get"]
    by_class = make_policy(acme={"tiers": tiers}).authorize(
        ctx("researcher"), ToolCall(tool="http_get")
    )
    assert (by_class.tier, by_class.rule) == (Tier.shadow, f"{prefix}.network.read")


def test_defaults_tier_maps_apply_to_every_tenant_and_the_tenant_wins_on_a_key(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        defaults={
            "tiers": {"actions": {"process.exec": "act_with_approval", "fs.write": "suggest"}}
        },
        acme={"tiers": {"actions": {"fs.write": "act_auto"}}},
    )
    shell = policy.authorize(ctx(), ToolCall(tool="shell"))
    assert (shell.outcome, shell.rule) == (Outcome.hold, "defaults.tiers.actions.process.exec")
    write = policy.authorize(ctx(), ToolCall(tool="write_file"))
    assert (write.outcome, write.rule) == (Outcome.allow, "tenants.acme.tiers.actions.fs.write")


def test_defaults_agent_actions_merge_per_action_with_the_tenants(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        defaults={"tiers": {"agent_actions": {"researcher": {"shell": "shadow"}}}},
        acme={"tiers": {"agent_actions": {"researcher": {"echo": "suggest"}}}},
    )
    assert policy.authorize(ctx("researcher"), ToolCall(tool="shell")).rule == (
        "defaults.tiers.agent_actions.researcher.shell"
    )
    assert policy.authorize(ctx("researcher"), ToolCall(tool="echo")).rule == (
        "tenants.acme.tiers.agent_actions.researcher.echo"
    )


def test_a_more_specific_level_from_defaults_beats_a_less_specific_one_of_the_tenant(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        defaults={"tiers": {"agents": {"researcher": "shadow"}}},
        acme={"tiers": {"actions": {"http_get": "act_auto"}}},
    )
    decision = policy.authorize(ctx("researcher"), ToolCall(tool="http_get"))
    assert (decision.tier, decision.rule) == (Tier.shadow, "defaults.tiers.agents.researcher")


def test_llm_calls_resolve_by_provider_then_llm_call_class(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    llm_call: Callable[..., LLMCall],
) -> None:
    policy = make_policy(acme={"tiers": {"actions": {"llm.call": "suggest", "openai": "shadow"}}})
    assert policy.authorize(ctx(), llm_call("fake")).rule == "tenants.acme.tiers.actions.llm.call"
    assert policy.authorize(ctx(), llm_call("openai", "gpt-4o-mini")).rule == (
        "tenants.acme.tiers.actions.openai"
    )
