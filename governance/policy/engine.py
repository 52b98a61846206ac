"""The policy engine: a validated config, and the authorization of one action against it.

Authorization order (each step can end it):

1. Tenant: a tenant that is not configured is denied ("unknown tenant 'x'").
2. Deny rules: `defaults.deny` then the tenant's `deny`; the first match denies, with its reason.
3. Known action: an undeclared tool or provider, or a model with no price (and no default price),
   is denied: nothing runs that the deployment has not described.
4. Grants: an unexpired grant for the agent and the action (name or class), from the config or
   passed in by the caller, marks the action granted.
5. Allow-list: a tool or provider outside the tenant's allow-list is denied unless granted.
   No allow-list means nothing is allowed (deny by default).
6. Hooks: `defaults.hooks` then the tenant's; the first deny wins, a crashing hook denies.
7. Tier: a granted action runs at act_auto; otherwise the tier is resolved most specific first
   (see tiers.py) and gives the outcome: allow, hold, suggest or shadow. An action to hold needs
   a requester (the context's user): without one it is denied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from governance.policy.actions import (
    LLM_CALL_CLASS,
    Action,
    LLMCall,
    ToolCall,
    canonical_json,
    estimate_input_tokens,
)
from governance.policy.checks import Problem, check_references
from governance.policy.config import GovernanceConfig, ModelPrice
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.grants import Grant
from governance.policy.hooks import load_hook, run_hooks
from governance.policy.loader import DICT_SOURCE, ConfigError, load_config, parse_config
from governance.policy.tenant import (
    BUILTIN,
    HookLoader,
    TenantPolicy,
    build_tenant_policy,
    check_defaults,
)
from governance.policy.tiers import Outcome, Tier, TierLevel, outcome_for
from governance.policy.usage import MICRO, Usage, cost_micro_usd

_TIER_WORDING = {
    Outcome.allow: "allowed",
    Outcome.hold: "held until approved",
    Outcome.suggest: "filed as a suggestion, not run",
    Outcome.shadow: "recorded in shadow mode, not run",
}


class Policy:
    """A loaded policy: effective settings per tenant, prices, and `authorize`."""

    def __init__(
        self,
        config: GovernanceConfig,
        *,
        source: str = DICT_SOURCE,
        hook_loader: HookLoader = load_hook,
    ) -> None:
        self._config = config
        self._source = source
        self._hook_loader = hook_loader
        problems: list[Problem] = check_references(config)
        problems += check_defaults(config, hook_loader)
        tenants: dict[str, TenantPolicy] = {}
        for name in config.tenants:
            tenant, tenant_problems = build_tenant_policy(name, config, hook_loader)
            problems += tenant_problems
            if tenant is not None:
                tenants[name] = tenant
        if problems:
            # Defaults' problems show up once per tenant too; report each once, in order.
            raise ConfigError(source, list(dict.fromkeys(problems)))
        self._tenants: Mapping[str, TenantPolicy] = MappingProxyType(tenants)
        dumped = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
        self._version = hashlib.sha256(canonical_json(dumped).encode("utf-8")).hexdigest()[:16]
        #: Whether any step has a timeout (the worker's main process skips reading each
        #: request's policy when none has).
        self.has_step_timeouts = (
            any(t.step_timeout for t in config.tools.values())
            or any(p.step_timeout for p in config.providers.values())
            or any(t.step_timeout for t in tenants.values())
        )

    @classmethod
    def from_file(cls, path: str | Path, *, hook_loader: HookLoader = load_hook) -> Policy:
        """Load the YAML policy file at `path`; raise ConfigError naming file, field and reason."""
        return cls(load_config(path), source=str(path), hook_loader=hook_loader)

    @classmethod
    def from_dict(
        cls, data: object, source: str = DICT_SOURCE, *, hook_loader: HookLoader = load_hook
    ) -> Policy:
        """Build from an already-parsed mapping (tests, or config from another store)."""
        return cls(parse_config(data, source), source=source, hook_loader=hook_loader)

    @property
    def config(self) -> GovernanceConfig:
        return self._config

    @property
    def hook_loader(self) -> HookLoader:
        """How the policy's hooks are loaded (a reload of the file uses the same)."""
        return self._hook_loader

    @property
    def source(self) -> str:
        """The file the policy came from, or "<dict>"."""
        return self._source

    @property
    def version(self) -> str:
        """16 hex chars of the sha256 of the canonical config: same content, same version."""
        return self._version

    @property
    def tenant_names(self) -> tuple[str, ...]:
        return tuple(self._tenants)

    def tenant(self, name: str) -> TenantPolicy | None:
        """The effective (defaults merged) settings of tenant `name`, None if not configured."""
        return self._tenants.get(name)

    def action_class(self, action: Action) -> str | None:
        """The side-effect class: the tool's declared class, "llm.call", or None if unknown."""
        if isinstance(action, LLMCall):
            return LLM_CALL_CLASS
        spec = self._config.tools.get(action.tool)
        return None if spec is None else spec.class_

    def price(self, provider: str, model: str) -> ModelPrice | None:
        """The model's price, else the provider's default price, else None."""
        spec = self._config.providers.get(provider)
        if spec is None:
            return None
        return spec.models.get(model, spec.default_price)

    def cost_micro_usd(
        self, provider: str, model: str, input_tokens: int, output_tokens: int
    ) -> int:
        """Cost in micro-dollars, rounded up; ValueError for a model without a price."""
        price = self.price(provider, model)
        if price is None:
            raise ValueError(f"unknown model {model!r} for provider {provider!r}: no price")
        return cost_micro_usd(
            input_tokens, output_tokens, price.input_usd_per_mtok, price.output_usd_per_mtok
        )

    def cost_usd(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD (of the rounded-up micro-dollar amount that usage records)."""
        return self.cost_micro_usd(provider, model, input_tokens, output_tokens) / MICRO

    def step_timeout(self, tenant: TenantPolicy, action: Action) -> timedelta | None:
        """How long one step of ``action`` may run: its tool's (or provider's) ``step_timeout``,
        else the tenant's; None when neither says."""
        if isinstance(action, LLMCall):
            provider = self._config.providers.get(action.provider)
            own = provider.step_timeout if provider else None
        else:
            tool = self._config.tools.get(action.tool)
            own = tool.step_timeout if tool else None
        return own or tenant.step_timeout

    def estimate_usage(self, action: Action) -> Usage:
        """What the action may use at most, reserved before it runs.

        A tool call is one step and one tool call. An LLM call is one step, the estimated prompt
        tokens, `max_tokens` of output, and the cost of both rounded up to the micro-dollar.
        """
        if isinstance(action, ToolCall):
            return Usage(steps=1, tool_calls=1)
        input_tokens = estimate_input_tokens(action.messages)
        cost = self.cost_micro_usd(action.provider, action.model, input_tokens, action.max_tokens)
        return Usage(
            steps=1,
            input_tokens=input_tokens,
            output_tokens=action.max_tokens,
            cost_micro_usd=cost,
        )

    def authorize(
        self,
        ctx: ActionContext,
        action: Action,
        *,
        grants: Sequence[Grant] = (),
        now: datetime | None = None,
    ) -> Decision:
        """Decide what happens to `action` taken by `ctx.agent` of `ctx.tenant` (see module doc).

        `grants` are extra grants of the tenant (e.g. from the store); `now` defaults to the
        current UTC time and decides which grants have expired. The decision carries this
        policy's version.
        """
        return replace(
            self._decide(ctx, action, grants=grants, now=now), policy_version=self._version
        )

    def _decide(
        self,
        ctx: ActionContext,
        action: Action,
        *,
        grants: Sequence[Grant],
        now: datetime | None,
    ) -> Decision:
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        name = action.name
        action_class = self.action_class(action)
        what = f"tool {name!r}" if isinstance(action, ToolCall) else f"provider {name!r}"
        t = ctx.tenant

        def deny(reason: str, rule: str, granted: bool = False) -> Decision:
            return Decision(Outcome.deny, reason, None, rule, action_class, granted)

        # 1. tenant
        tenant = self._tenants.get(t)
        if tenant is None:
            return deny(f"unknown tenant {t!r} (not configured; {what} not run)", "tenants")

        # 2. deny rules
        for bound in tenant.deny:
            if bound.rule.matches(ctx.agent, name, action_class):
                why = bound.rule.reason or f"denied by rule {bound.path}"
                return deny(
                    f"{what} denied for agent {ctx.agent!r} of tenant {t!r}: {why}", bound.path
                )

        # 3. known tool / provider / model
        if isinstance(action, ToolCall):
            if action_class is None:
                return deny(f"unknown tool {name!r} (not declared; tenant {t!r})", "tools")
        else:
            if name not in self._config.providers:
                return deny(f"unknown provider {name!r} (not declared; tenant {t!r})", "providers")
            if self.price(name, action.model) is None:
                return deny(
                    f"unknown model {action.model!r} for provider {name!r} "
                    f"(no price and no default_price; tenant {t!r})",
                    f"providers.{name}.models",
                )

        # 4. grants
        grant = next(
            (g for g in (*tenant.grants, *grants) if g.matches(ctx.agent, name, action_class, now)),
            None,
        )
        granted = grant is not None

        # 5. allow-list
        if isinstance(action, ToolCall):
            listed, field = name in tenant.allowed_tools, "allowed_tools"
        else:
            listed, field = name in tenant.allowed_providers, "allowed_providers"
        if not listed and not granted:
            rule = tenant.source(field)
            note = ""
            if rule == BUILTIN:
                rule = f"tenants.{t}.{field}"
                note = f" (no {field} configured: nothing is allowed)"
            return deny(f"{what} is not allowed for tenant {t!r}{note}", rule)

        # 6. hooks
        if tenant.hooks:
            verdict = run_hooks(
                [h.hook for h in tenant.hooks],
                ctx,
                action,
                names=[h.path for h in tenant.hooks],
            )
            if not verdict.allowed:
                return deny(verdict.reason or "denied by a hook", verdict.hook or "hooks", granted)

        # 7. tier
        if grant is not None:
            by = f" by {grant.granted_by}" if grant.granted_by else ""
            reason = (
                f"{what} for agent {ctx.agent!r} of tenant {t!r}: allowed, granted{by} "
                f"until {grant.until.isoformat()}"
            )
            return Decision(
                Outcome.allow, reason, Tier.act_auto, "grant", action_class, True, TierLevel.grant
            )
        resolution = tenant.tiers.resolve(ctx.agent, name, action_class)
        outcome = outcome_for(resolution.tier)
        if outcome is Outcome.hold and not ctx.user:
            return deny(
                f"{what} for agent {ctx.agent!r} of tenant {t!r} needs approval (tier "
                f"{resolution.tier} from {resolution.rule}), and an approval-tier action needs a "
                "requester: the context has no user (who asks for it, and may not approve it)",
                resolution.rule,
            )
        reason = (
            f"{what} for agent {ctx.agent!r} of tenant {t!r}: {_TIER_WORDING[outcome]} "
            f"(tier {resolution.tier} from {resolution.rule})"
        )
        return Decision(
            outcome,
            reason,
            resolution.tier,
            resolution.rule,
            action_class,
            False,
            resolution.level,
        )
