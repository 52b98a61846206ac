"""The effective settings of one tenant: `defaults` and the tenant's own section, merged.

Merging (see config.py): a field the tenant writes replaces the default's; `approval` and `retry`
merge field by field over built-in values; `deny`, `hooks` and `grants` are the
defaults' followed by the tenant's; tier maps merge key by key. Every value is resolved here, once,
so the per-action path (authorize, admit) only reads plain frozen objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel

from governance.policy.checks import Problem
from governance.policy.config import (
    ApprovalSettings,
    Budget,
    DenyRule,
    GovernanceConfig,
    Notifier,
    RateLimits,
    RetrySettings,
    TenantSettings,
    TierSettings,
)
from governance.policy.grants import Grant
from governance.policy.hooks import Hook, HookLoadError
from governance.policy.long_running import DEFAULT_PRESET, PRESETS, LongRunningLimits
from governance.policy.retry import RetryPolicy
from governance.policy.signing import RELEASE_HORIZON, parse_public_key, shared_keys
from governance.policy.tiers import TierSource, TierTable

BUILTIN = "built-in default"
DEFAULT_WARNING_THRESHOLD_PCT = 80
#: How long a task may wait for capacity or a rate turn before it fails, unless the policy says.
DEFAULT_MAX_WAIT = timedelta(hours=1)

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class ApprovalPolicy:
    """How many distinct reviewers must release a held action, how long a hold lives, how long a
    grant may last, and how long after the last signature a released call may still start."""

    quorum: int
    expiry: timedelta
    allow_self_approval: bool
    max_grant: timedelta = timedelta(hours=24)
    valid_for: timedelta = timedelta(hours=24)


@dataclass(frozen=True)
class BoundDenyRule:
    """A deny rule and its config path (e.g. `defaults.deny[0]`)."""

    path: str
    rule: DenyRule


@dataclass(frozen=True)
class BoundHook:
    """A loaded hook, its config path (e.g. `tenants.acme.hooks[1]`) and its spec."""

    path: str
    spec: str
    hook: Hook


@dataclass(frozen=True)
class TenantPolicy:
    """Everything policy decides for one tenant, resolved; `sources` maps a field to its path."""

    name: str
    allowed_tools: frozenset[str]
    allowed_providers: frozenset[str]
    allowed_domains: tuple[str, ...]
    allowed_networks: tuple[IPv4Network | IPv6Network, ...]
    deny: tuple[BoundDenyRule, ...]
    tiers: TierTable
    reviewers: Mapping[str, Ed25519PublicKey]
    approval: ApprovalPolicy
    notify: tuple[Notifier, ...]
    hooks: tuple[BoundHook, ...]
    grants: tuple[Grant, ...]
    concurrency: int | None
    #: Runs in flight at once (a run is in flight from its first admitted step until it has
    #: been idle for its idle timeout, or is closed); None: no limit.
    run_concurrency: int | None
    rate_limits: RateLimits
    budgets: tuple[Budget, ...]
    long_running: LongRunningLimits
    retry: RetryPolicy
    max_wait: timedelta
    warning_threshold_pct: int
    sources: Mapping[str, str]
    #: How long one step may run unless its tool or provider says (None: no limit), and whether
    #: a step that ran out of time may be retried ("transient") or fails ("permanent").
    step_timeout: timedelta | None = None
    step_timeout_error: str = "transient"
    #: The tenant's share of a saturated worker pool, relative to the others'.
    weight: float = 1.0

    def budget(self, period: str) -> Budget | None:
        """The budget of `period` ("run", "day" or "month"), if one is configured."""
        return next((b for b in self.budgets if b.period == period), None)

    def source(self, field: str) -> str:
        """The config path a replaced field came from, or "built-in default"."""
        return self.sources.get(field, BUILTIN)


HookLoader = Callable[[str], Hook]


class _Builder:
    """Collects the layers of one tenant and the problems found while resolving them."""

    def __init__(self, layers: list[tuple[str, TenantSettings]]) -> None:
        self.layers = layers
        self.problems: list[Problem] = []
        self.sources: dict[str, str] = {}

    def replaced(self, field: str) -> Any:
        """The value of the last layer that writes `field`, remembering where it came from."""
        for prefix, settings in reversed(self.layers):
            if field in settings.model_fields_set:
                self.sources[field] = f"{prefix}.{field}"
                return getattr(settings, field)
        self.sources[field] = BUILTIN
        return None

    def merged(self, field: str, model: type[_M]) -> _M:
        """Built-in values of `model`, overlaid field by field by each layer that writes them."""
        values: dict[str, Any] = {}
        for _prefix, settings in self.layers:
            layer = getattr(settings, field)
            if layer is not None:
                values.update({name: getattr(layer, name) for name in layer.model_fields_set})
        return model.model_validate(values)

    def concatenated(self, field: str) -> list[tuple[str, Any]]:
        """Items of `field` from every layer, in order, each with its config path."""
        items: list[tuple[str, Any]] = []
        for prefix, settings in self.layers:
            for i, item in enumerate(getattr(settings, field) or ()):
                items.append((f"{prefix}.{field}[{i}]", item))
        return items

    @property
    def prefix(self) -> str:
        return self.layers[-1][0]


def _tier_source(prefix: str, tiers: TierSettings | None) -> TierSource:
    if tiers is None:
        return TierSource(f"{prefix}.tiers")
    return TierSource(
        f"{prefix}.tiers", tiers.default, tiers.actions, tiers.agents, tiers.agent_actions
    )


def _expand(names: list[str] | None, declared: Mapping[str, object]) -> frozenset[str]:
    if names is None:
        return frozenset()
    if "*" in names:
        return frozenset(declared)
    return frozenset(names)


def build_tenant_policy(
    name: str, config: GovernanceConfig, load_hook: HookLoader
) -> tuple[TenantPolicy | None, list[Problem]]:
    """Resolve tenant `name` of `config`; return it, or None and the problems that prevent it."""
    layers = [("defaults", config.defaults), (f"tenants.{name}", config.tenants[name])]
    return _build(name, layers, config, load_hook)


def check_defaults(config: GovernanceConfig, load_hook: HookLoader) -> list[Problem]:
    """Problems of the `defaults` section on its own (reported even when no tenant exists)."""
    return _build("defaults", [("defaults", config.defaults)], config, load_hook)[1]


def _build(
    name: str,
    layers: list[tuple[str, TenantSettings]],
    config: GovernanceConfig,
    load_hook: HookLoader,
) -> tuple[TenantPolicy | None, list[Problem]]:
    b = _Builder(layers)
    prefix = b.prefix
    merged_note = "" if len(layers) == 1 else " (after merging defaults)"

    reviewers = {
        name: parse_public_key(text) for name, text in (b.replaced("reviewers") or {}).items()
    }
    approval = b.merged("approval", ApprovalSettings)
    for names in shared_keys(reviewers):
        b.problems.append(
            (
                f"{prefix}.reviewers",
                f"{' and '.join(names)} are listed with the same key: one key is one reviewer "
                f"(it would count {len(names)} times toward a quorum){merged_note}",
            )
        )
    if reviewers and approval.quorum > len(reviewers):
        b.problems.append(
            (
                f"{prefix}.approval.quorum",
                f"quorum {approval.quorum} needs more reviewers than the {len(reviewers)} "
                f"configured ({', '.join(reviewers)}){merged_note}",
            )
        )

    retry: RetryPolicy | None = None
    try:
        retry = RetryPolicy(**b.merged("retry", RetrySettings).model_dump())
    except ValueError as exc:
        b.problems.append((f"{prefix}.retry", f"{exc}{merged_note}"))

    hooks: list[BoundHook] = []
    for path, spec in b.concatenated("hooks"):
        try:
            hooks.append(BoundHook(path, spec, load_hook(spec)))
        except HookLoadError as exc:
            b.problems.append((path, str(exc)))

    max_wait = b.replaced("max_wait") or DEFAULT_MAX_WAIT
    if approval.valid_for + approval.expiry > RELEASE_HORIZON:
        b.problems.append(
            (
                f"{prefix}.approval.valid_for",
                f"valid_for ({approval.valid_for}) plus expiry ({approval.expiry}) is longer than "
                f"the {RELEASE_HORIZON.days} days the ledger remembers an ended task: a release "
                f"copied after that could run the call again{merged_note}",
            )
        )
    if retry is not None:
        budget = timedelta(seconds=-(-retry.budget_ms() // 1000))  # whole seconds, up
        if approval.valid_for < max_wait + budget:
            b.problems.append(
                (
                    f"{prefix}.approval.valid_for",
                    f"valid_for ({approval.valid_for}) is shorter than max_wait ({max_wait}) plus "
                    f"the retry budget ({budget}): a released call that waits its turn, then "
                    f"retries, would find its release expired and be held again{merged_note}",
                )
            )

    if b.problems or retry is None:
        return None, b.problems

    long_running_spec = b.replaced("long_running")
    threshold = b.replaced("warning_threshold_pct")
    policy = TenantPolicy(
        name=name,
        allowed_tools=_expand(b.replaced("allowed_tools"), config.tools),
        allowed_providers=_expand(b.replaced("allowed_providers"), config.providers),
        allowed_domains=tuple(b.replaced("allowed_domains") or ()),
        allowed_networks=tuple(b.replaced("allowed_networks") or ()),
        deny=tuple(BoundDenyRule(path, rule) for path, rule in b.concatenated("deny")),
        tiers=TierTable.merge(
            _tier_source("defaults", config.defaults.tiers),
            _tier_source(prefix, layers[-1][1].tiers if len(layers) > 1 else None),
        ),
        reviewers=MappingProxyType(reviewers),
        approval=ApprovalPolicy(
            approval.quorum,
            approval.expiry,
            approval.allow_self_approval,
            approval.max_grant,
            approval.valid_for,
        ),
        notify=tuple(b.replaced("notify") or ()),
        hooks=tuple(hooks),
        grants=tuple(grant for _path, grant in b.concatenated("grants")),
        concurrency=b.replaced("concurrency"),
        run_concurrency=b.replaced("run_concurrency"),
        rate_limits=b.replaced("rate_limits") or RateLimits(),
        budgets=tuple(b.replaced("budgets") or ()),
        long_running=(
            PRESETS[DEFAULT_PRESET] if long_running_spec is None else long_running_spec.resolve()
        ),
        retry=retry,
        max_wait=max_wait,
        warning_threshold_pct=DEFAULT_WARNING_THRESHOLD_PCT if threshold is None else threshold,
        step_timeout=b.replaced("step_timeout"),
        step_timeout_error=b.replaced("step_timeout_error") or "transient",
        weight=b.replaced("weight") or 1.0,
        sources=MappingProxyType(dict(b.sources)),
    )
    return policy, []
