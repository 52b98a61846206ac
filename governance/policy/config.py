"""The policy file as pydantic models: what may be written, and every field's shape and range.

All models forbid unknown keys and are frozen. Tenant settings are layered: `defaults` applies to
every tenant, and a field a tenant writes (even as null) replaces the default's, except that
`approval` and `retry` merge field by field, `deny`, `hooks` and `grants` add up, and
the tier maps merge key by key. Cross-references between sections are checked in `checks.py`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fnmatch import fnmatchcase
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from governance.policy.actions import LLM_CALL_CLASS
from governance.policy.context import Identifier
from governance.policy.duration import PositiveDuration
from governance.policy.grants import Grant
from governance.policy.hooks import HOOK_SPEC_RE
from governance.policy.long_running import DEFAULT_PRESET, PRESETS, LongRunningLimits
from governance.policy.signing import parse_public_key
from governance.policy.tiers import Tier

GLOB_CHARS = frozenset("*?[")
_CLASS_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")

# Numbers are strict: YAML's `no`, `true` or `"3"` is a mistake to report, never 0, 1 or 3 (a
# concurrency of `no` would silently make every task of the tenant wait).
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
PositiveInt = Annotated[int, Field(ge=1, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _side_effect_class(value: str) -> str:
    if _CLASS_RE.fullmatch(value) is None:
        raise ValueError(
            f"a side-effect class is dot-separated words of [A-Za-z0-9_-], like 'fs.write' "
            f"(got {value!r})"
        )
    if value == LLM_CALL_CLASS:
        raise ValueError(f"{LLM_CALL_CLASS!r} is reserved for LLM calls")
    return value


SideEffectClass = Annotated[str, AfterValidator(_side_effect_class)]


class ToolSpec(_Model):
    """A tool the deployment knows, and the side-effect class tiers and rules may refer to."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_: SideEffectClass = Field(alias="class")
    description: str | None = None
    #: How long one call of the tool may run (Celery's soft time limit of the task); None: the
    #: tenant's ``step_timeout``.
    step_timeout: PositiveDuration | None = None


def _tool_shorthand(value: Any) -> Any:
    return {"class": value} if isinstance(value, str) else value


ToolEntry = Annotated[ToolSpec, BeforeValidator(_tool_shorthand)]
"""`echo: compute` is short for `echo: {class: compute}`."""


class ModelPrice(_Model):
    """Price of a model in USD per million tokens."""

    input_usd_per_mtok: NonNegFloat
    output_usd_per_mtok: NonNegFloat


class ProviderSpec(_Model):
    """An LLM provider: the models it prices, and optionally a price for any other model.

    ``scope`` says who shares the provider's cooldown (a 429's Retry-After) and ``rate_limit``:
    ``tenant`` (each tenant its own, as with a key per tenant) or ``deployment`` (every tenant
    together, as with one API key for the deployment: one tenant's 429 pauses everyone's calls).
    A tenant's own ``rate_limits.providers`` applies in both cases, on top.
    """

    models: dict[Annotated[str, Field(min_length=1)], ModelPrice] = Field(default_factory=dict)
    default_price: ModelPrice | None = None
    description: str | None = None
    scope: Literal["tenant", "deployment"] = "tenant"
    rate_limit: RateLimit | None = None
    #: How long one call to the provider may run; None: the tenant's ``step_timeout``.
    step_timeout: PositiveDuration | None = None

    @model_validator(mode="after")
    def _rate_limit_needs_deployment_scope(self) -> ProviderSpec:
        if self.rate_limit is not None and self.scope != "deployment":
            raise ValueError(
                "a provider-wide rate_limit needs `scope: deployment` (per-tenant provider "
                "rates go under a tenant's rate_limits.providers)"
            )
        return self


class TierSettings(_Model):
    """Tier maps of one layer; keys of `actions` are tool/provider names or side-effect classes."""

    default: Tier | None = None
    actions: dict[str, Tier] = Field(default_factory=dict)
    agents: dict[Identifier, Tier] = Field(default_factory=dict)
    agent_actions: dict[Identifier, dict[str, Tier]] = Field(default_factory=dict)


class DenyRule(_Model):
    """Refuse matching actions. Globs (fnmatch, case-sensitive); an omitted field matches all."""

    agent: Annotated[str, Field(min_length=1)] | None = None
    action: Annotated[str, Field(min_length=1)] | None = None
    reason: str | None = None

    def matches(self, agent: str, action_name: str, action_class: str | None) -> bool:
        """Whether the rule covers `agent` taking the action (by name or by class)."""
        if self.agent is not None and not fnmatchcase(agent, self.agent):
            return False
        if self.action is None:
            return True
        return fnmatchcase(action_name, self.action) or (
            action_class is not None and fnmatchcase(action_class, self.action)
        )


class ApprovalSettings(_Model):
    """How held actions are released. Unset fields inherit (from defaults, then built-ins).

    `max_grant` bounds a grant given with an approval; `valid_for` is how long after the last
    signature a released call may still start (it may wait for capacity, or retry, meanwhile).
    """

    quorum: PositiveInt = 1
    expiry: PositiveDuration = timedelta(hours=24)
    allow_self_approval: bool = Field(default=False, strict=True)
    max_grant: PositiveDuration = timedelta(hours=24)
    valid_for: PositiveDuration = timedelta(hours=24)


def _reviewer_key(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            "a reviewer is listed with the public half of their key: "
            "`name: ed25519:<base64>` (run `govctl reviewers keygen NAME`)"
        )
    parse_public_key(value)
    return value


ReviewerKey = Annotated[str, BeforeValidator(_reviewer_key)]


def _reviewers_shape(value: Any) -> Any:
    if isinstance(value, list):
        raise ValueError(
            "reviewers are listed with the public halves of their keys, as a mapping "
            "`{alice: 'ed25519:...', bob: 'ed25519:...'}` (run `govctl reviewers keygen NAME` "
            "for each reviewer and paste the line it prints)"
        )
    return value


class Notifier(_Model):
    """Where reviewers are told that something waits for them: a generic JSON webhook, or a
    Slack incoming webhook. Calls are retried with backoff and never block a worker."""

    kind: Literal["webhook", "slack"]
    url: Annotated[str, Field(pattern=r"^https?://", min_length=8, max_length=2048)]


class RetrySettings(_Model):
    """Retry of failed actions (see RetryPolicy). Unset fields inherit; a null cap means none."""

    max_retries: NonNegInt = 3
    backoff_base_ms: NonNegInt = 200
    backoff_cap_ms: NonNegInt | None = 10_000
    jitter_ratio: Ratio = 0.2


class RateLimit(_Model):
    """A token bucket: `rate` actions per `per`, bursts of up to `burst` (default: `rate`)."""

    rate: PositiveInt
    per: PositiveDuration = timedelta(seconds=1)
    burst: PositiveInt = 0  # always filled in by _default_burst

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        # Only a usable rate is copied: a bad one is reported once, at `rate`, not again at burst.
        if isinstance(data, dict) and data.get("burst") is None:
            try:
                return {**data, "burst": _RATE.validate_python(data.get("rate"))}
            except ValidationError:
                pass
        return data

    @property
    def per_ms(self) -> int:
        """The window in whole milliseconds."""
        return round(self.per.total_seconds() * 1000)


_RATE: TypeAdapter[int] = TypeAdapter(PositiveInt)


class RateLimits(_Model):
    """Rate limits of a tenant: all its actions together, and per LLM provider."""

    tenant: RateLimit | None = None
    providers: dict[str, RateLimit] = Field(default_factory=dict)


BUDGET_LIMIT_FIELDS = ("steps", "tool_calls", "tokens", "input_tokens", "output_tokens", "cost_usd")


class Budget(_Model):
    """Usage allowed per run, per calendar day or per calendar month (UTC)."""

    period: Literal["run", "day", "month"]
    steps: NonNegInt | None = None
    tool_calls: NonNegInt | None = None
    tokens: NonNegInt | None = None
    input_tokens: NonNegInt | None = None
    output_tokens: NonNegInt | None = None
    cost_usd: NonNegFloat | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if all(getattr(self, name) is None for name in BUDGET_LIMIT_FIELDS):
            raise ValueError(f"a budget must set at least one of {', '.join(BUDGET_LIMIT_FIELDS)}")
        return self


class LongRunningSpec(_Model):
    """A long-running preset with some of its limits overridden (null switches one off)."""

    preset: str = DEFAULT_PRESET
    max_discovered_steps: NonNegInt | None = None
    max_discovery_depth: NonNegInt | None = None
    cost_alert_usd: NonNegFloat | None = None
    idle_timeout_s: NonNegInt | None = None
    max_same_step_repetitions: NonNegInt | None = None
    max_wall_time_s: NonNegFloat | None = None
    wall_time_grace_s: NonNegFloat = 1.0

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; expected one of {', '.join(PRESETS)}")
        return value

    def resolve(self) -> LongRunningLimits:
        """The preset's limits with the fields written here replacing the preset's."""
        base = PRESETS[self.preset]
        overrides = {name: getattr(self, name) for name in self.model_fields_set - {"preset"}}
        values = {
            name: overrides.get(name, getattr(base, name))
            for name in LongRunningLimits.__dataclass_fields__
        }
        return LongRunningLimits(**values)


def _preset_shorthand(value: Any) -> Any:
    return {"preset": value} if isinstance(value, str) else value


LongRunningEntry = Annotated[LongRunningSpec, BeforeValidator(_preset_shorthand)]
"""`long_running: extended` is short for `long_running: {preset: extended}`."""


def _hook_spec(value: str) -> str:
    if HOOK_SPEC_RE.fullmatch(value) is None:
        raise ValueError(f"a hook is written 'package.module:attribute' (got {value!r})")
    return value


HookSpec = Annotated[str, AfterValidator(_hook_spec)]


def _cidr(value: Any) -> Any:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a network is written as a string, like 10.0.0.0/8 (got {value!r})")
    try:
        return ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(
            f"not a network in CIDR notation, like 10.0.0.0/8 or fd00::/8 (got {value!r}: {exc})"
        ) from None


Cidr = Annotated[IPv4Network | IPv6Network, BeforeValidator(_cidr)]
"""An IP network, written `10.0.0.0/8`; host bits must be zero (`10.0.0.1/8` is an error)."""


class TenantSettings(_Model):
    """Settings of a tenant, or of every tenant when under `defaults`. None/absent inherits."""

    allowed_tools: list[str] | None = None
    allowed_providers: list[str] | None = None
    allowed_domains: list[Annotated[str, Field(min_length=1)]] | None = None
    allowed_networks: list[Cidr] | None = None
    deny: list[DenyRule] | None = None
    tiers: TierSettings | None = None
    reviewers: (
        Annotated[dict[Identifier, ReviewerKey], BeforeValidator(_reviewers_shape)] | None
    ) = None
    notify: list[Notifier] | None = None
    approval: ApprovalSettings | None = None
    hooks: list[HookSpec] | None = None
    grants: list[Grant] | None = None
    concurrency: NonNegInt | None = None
    run_concurrency: NonNegInt | None = None
    rate_limits: RateLimits | None = None
    budgets: list[Budget] | None = None
    long_running: LongRunningEntry | None = None
    warning_threshold_pct: Annotated[int, Field(ge=0, le=100, strict=True)] | None = None
    retry: RetrySettings | None = None
    max_wait: PositiveDuration | None = None
    step_timeout: PositiveDuration | None = None
    step_timeout_error: Literal["transient", "permanent"] | None = None
    #: The tenant's share of a saturated worker pool, relative to the others' (default 1).
    weight: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False, strict=True)] | None = None


class FairnessSettings(_Model):
    """How a saturated worker pool is shared between tenants (see docs/design.md, fair
    dispatch): what a tenant is charged for (`by`: worker `time`, `tasks`, or `tokens`, where a
    tool call costs `tool_call_tokens`), what a task is assumed to cost before its tenant has a
    history (`default_estimate`), how much estimated work per pool process the broker may hold
    beyond the tasks running (`slack`), and, per queue, a fixed pool capacity instead of the sum
    of the live workers' pool sizes (`capacity`)."""

    by: Literal["time", "tasks", "tokens"] = "time"
    slack: PositiveDuration = timedelta(milliseconds=100)
    default_estimate: PositiveDuration = timedelta(seconds=1)
    tool_call_tokens: PositiveInt = 1000
    capacity: dict[Annotated[str, Field(min_length=1, max_length=200)], PositiveInt] = Field(
        default_factory=dict
    )


class AuditSettings(_Model):
    """The audit log's retention: entries older than this are trimmed (after a signed record of
    where each chain now starts, so a trim beyond it is detected); null keeps everything."""

    retention: PositiveDuration | None = None


class GovernanceConfig(_Model):
    """The whole policy file."""

    version: Literal[1]
    audit: AuditSettings = Field(default_factory=AuditSettings)
    fairness: FairnessSettings = Field(default_factory=FairnessSettings)
    tools: dict[Identifier, ToolEntry] = Field(default_factory=dict)
    providers: dict[Identifier, ProviderSpec] = Field(default_factory=dict)
    defaults: TenantSettings = Field(default_factory=TenantSettings)
    tenants: dict[Identifier, TenantSettings] = Field(default_factory=dict)

    def action_names(self) -> frozenset[str]:
        """Every name a rule may refer to: tools, providers, tool classes and "llm.call"."""
        classes = {spec.class_ for spec in self.tools.values()}
        return frozenset({*self.tools, *self.providers, *classes, LLM_CALL_CLASS})
