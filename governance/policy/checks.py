"""Cross-reference checks of a parsed config: names that must refer to something declared.

Pydantic checks each field on its own; these checks need the whole file (is this allowed tool
declared? does this tier name a known action?). Each problem is a (field path, reason) pair.
"""

from __future__ import annotations

from collections.abc import Iterable

from governance.policy.config import GLOB_CHARS, GovernanceConfig, TenantSettings

Problem = tuple[str, str]


def check_references(config: GovernanceConfig) -> list[Problem]:
    """Every cross-reference problem of `config`, in file order."""
    problems: list[Problem] = []
    for name in config.providers:
        if name in config.tools:
            problems.append(
                (
                    f"providers.{name}",
                    f"{name!r} is both a tool and a provider; action names must be unambiguous",
                )
            )
    known = config.action_names()
    problems += _check_layer("defaults", config.defaults, config, known)
    for tenant, settings in config.tenants.items():
        problems += _check_layer(f"tenants.{tenant}", settings, config, known)
    return problems


def _check_layer(
    prefix: str, settings: TenantSettings, config: GovernanceConfig, known: frozenset[str]
) -> Iterable[Problem]:
    for i, tool in enumerate(settings.allowed_tools or ()):
        if tool != "*" and tool not in config.tools:
            yield f"{prefix}.allowed_tools[{i}]", f"unknown tool {tool!r} (not declared in tools)"
    for i, provider in enumerate(settings.allowed_providers or ()):
        if provider != "*" and provider not in config.providers:
            yield (
                f"{prefix}.allowed_providers[{i}]",
                f"unknown provider {provider!r} (not declared in providers)",
            )

    def unknown(action: str) -> str:
        return f"unknown action {action!r}: not a declared tool, provider, tool class or 'llm.call'"

    if settings.tiers is not None:
        for action in settings.tiers.actions:
            if action not in known:
                yield f"{prefix}.tiers.actions.{action}", unknown(action)
        for agent, inner in settings.tiers.agent_actions.items():
            for action in inner:
                if action not in known:
                    yield f"{prefix}.tiers.agent_actions.{agent}.{action}", unknown(action)
    for i, rule in enumerate(settings.deny or ()):
        pattern = rule.action
        if pattern is not None and not GLOB_CHARS & set(pattern) and pattern not in known:
            yield f"{prefix}.deny[{i}].action", unknown(pattern)
    for i, grant in enumerate(settings.grants or ()):
        if grant.action not in known:
            yield f"{prefix}.grants[{i}].action", unknown(grant.action)
    if settings.rate_limits is not None:
        for provider in settings.rate_limits.providers:
            if provider not in config.providers:
                yield (
                    f"{prefix}.rate_limits.providers.{provider}",
                    f"unknown provider {provider!r} (not declared in providers)",
                )
    seen: dict[str, int] = {}
    for i, budget in enumerate(settings.budgets or ()):
        if budget.period in seen:
            yield (
                f"{prefix}.budgets[{i}].period",
                f"a second budget for period {budget.period!r} (first at "
                f"{prefix}.budgets[{seen[budget.period]}]); put its limits in one budget",
            )
        else:
            seen[budget.period] = i
