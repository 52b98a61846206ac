"""Autonomy tiers: how much an allowed action may do on its own, resolved most specific first.

Precedence (seed 003, `effective_tier_for`), each level trying the action's name before its
side-effect class:

1. agent + action: `tiers.agent_actions[agent][name]`, then `[agent][class]`
2. agent: `tiers.agents[agent]`
3. action: `tiers.actions[name]`, then `tiers.actions[class]`
4. tenant default: `tenants.<t>.tiers.default`
5. global default: `defaults.tiers.default` (act_auto when not configured)

The maps of `defaults.tiers` are merged under the tenant's (the tenant wins on the same key), so
every entry remembers the config path it came from and a decision can name the rule that made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Tier(StrEnum):
    """act_auto runs; act_with_approval waits for a reviewer; suggest and shadow never run."""

    act_auto = "act_auto"
    act_with_approval = "act_with_approval"
    suggest = "suggest"
    shadow = "shadow"


class Outcome(StrEnum):
    """What happens to the action: run, refuse, hold for approval, file a suggestion, record."""

    allow = "allow"
    deny = "deny"
    hold = "hold"
    suggest = "suggest"
    shadow = "shadow"


TIER_OUTCOMES: Mapping[Tier, Outcome] = MappingProxyType(
    {
        Tier.act_auto: Outcome.allow,
        Tier.act_with_approval: Outcome.hold,
        Tier.suggest: Outcome.suggest,
        Tier.shadow: Outcome.shadow,
    }
)


def outcome_for(tier: Tier) -> Outcome:
    """The outcome an action at `tier` gets once it is authorized."""
    return TIER_OUTCOMES[tier]


class TierLevel(StrEnum):
    """Which precedence level decided a tier."""

    agent_action = "agent_action"
    agent = "agent"
    action = "action"
    tenant_default = "tenant_default"
    global_default = "global_default"
    grant = "grant"


BUILTIN_DEFAULT_RULE = "built-in default (act_auto)"


@dataclass(frozen=True)
class TierEntry:
    """A configured tier and the config path that set it."""

    tier: Tier
    rule: str


@dataclass(frozen=True)
class TierResolution:
    """The tier an action gets, the level that decided it and the config path of that rule."""

    tier: Tier
    level: TierLevel
    rule: str


@dataclass(frozen=True)
class TierSource:
    """One layer of tier settings (defaults or a tenant) with the config prefix it lives under."""

    prefix: str
    default: Tier | None = None
    actions: Mapping[str, Tier] = field(default_factory=dict)
    agents: Mapping[str, Tier] = field(default_factory=dict)
    agent_actions: Mapping[str, Mapping[str, Tier]] = field(default_factory=dict)


@dataclass(frozen=True)
class TierTable:
    """Effective tier settings of one tenant: the defaults' maps with the tenant's on top."""

    tenant_default: TierEntry | None = None
    global_default: TierEntry | None = None
    actions: Mapping[str, TierEntry] = field(default_factory=dict)
    agents: Mapping[str, TierEntry] = field(default_factory=dict)
    agent_actions: Mapping[str, Mapping[str, TierEntry]] = field(default_factory=dict)

    @classmethod
    def merge(cls, defaults: TierSource, tenant: TierSource) -> TierTable:
        """Layer `tenant` over `defaults`: same key, tenant wins; different keys, both apply."""
        actions: dict[str, TierEntry] = {}
        agents: dict[str, TierEntry] = {}
        agent_actions: dict[str, dict[str, TierEntry]] = {}
        for src in (defaults, tenant):
            for name, tier in src.actions.items():
                actions[name] = TierEntry(tier, f"{src.prefix}.actions.{name}")
            for agent, tier in src.agents.items():
                agents[agent] = TierEntry(tier, f"{src.prefix}.agents.{agent}")
            for agent, inner in src.agent_actions.items():
                merged = agent_actions.setdefault(agent, {})
                for name, tier in inner.items():
                    merged[name] = TierEntry(tier, f"{src.prefix}.agent_actions.{agent}.{name}")

        def entry(src: TierSource) -> TierEntry | None:
            return None if src.default is None else TierEntry(src.default, f"{src.prefix}.default")

        return cls(
            tenant_default=entry(tenant),
            global_default=entry(defaults),
            actions=MappingProxyType(actions),
            agents=MappingProxyType(agents),
            agent_actions=MappingProxyType(
                {agent: MappingProxyType(inner) for agent, inner in agent_actions.items()}
            ),
        )

    def resolve(self, agent: str, action_name: str, action_class: str | None) -> TierResolution:
        """The tier of `agent` taking the action, most specific rule first (see module doc)."""
        keys = [action_name] if action_class is None else [action_name, action_class]
        per_agent = self.agent_actions.get(agent, {})
        for key in keys:
            if key in per_agent:
                return _resolution(per_agent[key], TierLevel.agent_action)
        if agent in self.agents:
            return _resolution(self.agents[agent], TierLevel.agent)
        for key in keys:
            if key in self.actions:
                return _resolution(self.actions[key], TierLevel.action)
        if self.tenant_default is not None:
            return _resolution(self.tenant_default, TierLevel.tenant_default)
        if self.global_default is not None:
            return _resolution(self.global_default, TierLevel.global_default)
        return TierResolution(Tier.act_auto, TierLevel.global_default, BUILTIN_DEFAULT_RULE)


def _resolution(entry: TierEntry, level: TierLevel) -> TierResolution:
    return TierResolution(entry.tier, level, entry.rule)
