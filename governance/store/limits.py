"""Translates a tenant's effective policy into the numbers the admission script checks.

The policy layer says *what* the limits are (rates, budgets per period, long-running presets);
this module turns them into the flat, integer form the Lua scripts take: GCRA emission intervals,
budget checks per usage window, cost in micro-USD. It is the only place that knows both shapes.
How each limit travels to the scripts, and what it does there, is declared in
:mod:`governance.store.vocabulary` (``LIMIT_KINDS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from governance.policy.actions import Action, LLMCall
from governance.policy.config import ProviderSpec, RateLimit
from governance.policy.limits import ViolationType
from governance.policy.long_running import LongRunningLimits
from governance.policy.tenant import TenantPolicy
from governance.store.keys import WINDOW_ORDER, Period

#: How long a run stays in flight after its last step, for a tenant's ``run_concurrency``, when
#: its long-running limits have no idle timeout.
DEFAULT_RUN_IDLE_S = 1800

#: The usage fields a window counts (and reserves as ``r_<field>``), in the scripts' order.
USAGE_FIELDS = ("steps", "tool_calls", "input_tokens", "output_tokens", "cost")

#: The fields of a usage window (a hash) that admission reads: what was used, what tasks in
#: flight reserved, and what the run window also keeps: its last activity (ms), the steps
#: discovered in it, its first admitted step (ms), the cost alert threshold reviewers moved it
#: to (micro-USD), whether they stopped the run at its alert, whether its wall-time warning is
#: audited.
WINDOW_FIELDS = (
    *USAGE_FIELDS,
    *(f"r_{f}" for f in USAGE_FIELDS),
    "last_ms",
    "discovered",
    "started_ms",
    "alert_at",
    "alert_stop",
    "wall_warned",
)


@dataclass(frozen=True)
class BudgetKind:
    """What a budget limits: the usage fields it sums, and the violation it raises."""

    name: str
    sums: tuple[str, ...]
    violation: ViolationType


BUDGET_KIND_TABLE: tuple[BudgetKind, ...] = (
    BudgetKind("steps", ("steps",), ViolationType.step_limit),
    BudgetKind("tool_calls", ("tool_calls",), ViolationType.tool_call_limit),
    BudgetKind("tokens", ("input_tokens", "output_tokens"), ViolationType.token_limit),
    BudgetKind("input_tokens", ("input_tokens",), ViolationType.input_token_limit),
    BudgetKind("output_tokens", ("output_tokens",), ViolationType.output_token_limit),
    BudgetKind("cost", ("cost",), ViolationType.cost_limit),
)


def _check_budget_kinds() -> None:
    for kind in BUDGET_KIND_TABLE:
        at = [USAGE_FIELDS.index(f) for f in kind.sums]
        if at != list(range(at[0], at[0] + len(at))):
            raise ValueError(f"budget kind {kind.name}: its usage fields must be adjacent")


_check_budget_kinds()


def budget_check_args(window: int, kind: str, limit: int) -> list[int | str]:
    """One budget check as the scripts take it (``vocabulary``'s ``checks``): [window 1..3,
    limit, first and last usage field it sums (1-based, in ``USAGE_FIELDS``), violation]."""
    budget = _BUDGET_KIND[kind]
    first = USAGE_FIELDS.index(budget.sums[0]) + 1
    return [window, limit, first, first + len(budget.sums) - 1, budget.violation.value]


_BUDGET_KIND = {k.name: k for k in BUDGET_KIND_TABLE}

#: Budget kinds the scripts understand, with the violation each one raises.
BUDGET_KINDS: dict[str, ViolationType] = {k.name: k.violation for k in BUDGET_KIND_TABLE}


@dataclass(frozen=True)
class Rate:
    """A GCRA rate: one call per ``interval_ms``, up to ``burst`` at once."""

    interval_ms: float
    burst: int
    rate: int
    per_s: float

    @classmethod
    def of(cls, limit: RateLimit | None) -> Rate | None:
        if limit is None:
            return None
        per_ms = limit.per.total_seconds() * 1000.0
        return cls(
            interval_ms=per_ms / limit.rate,
            burst=limit.burst,
            rate=limit.rate,
            per_s=limit.per.total_seconds(),
        )

    def as_args(self) -> list[float | int]:
        """[emission interval ms, burst], as the admission script takes a rate."""
        return [self.interval_ms, self.burst]

    def describe(self) -> str:
        per = f"{self.per_s:g}s"
        return f"{self.rate} per {per} (burst {self.burst})"


@dataclass(frozen=True)
class BudgetCheck:
    """One limit on one usage window: e.g. tokens of the tenant's current day <= 100000."""

    period: Period
    kind: str
    limit: int

    @property
    def violation_type(self) -> ViolationType:
        return BUDGET_KINDS[self.kind]


@dataclass(frozen=True)
class AdmissionLimits:
    """Everything admission enforces for one action of one tenant, in script-ready form."""

    concurrency: int | None = None
    tenant_rate: Rate | None = None
    provider_rate: Rate | None = None
    budget_checks: tuple[BudgetCheck, ...] = ()
    long_running: LongRunningLimits = field(default_factory=LongRunningLimits)
    warning_threshold_pct: int = 80
    #: How long a task may wait (in the wait list or for a booked turn) before it fails.
    max_wait_ms: int = 3_600_000
    #: The LLM provider's cooldown and rate are the deployment's, shared by every tenant
    #: (``providers.NAME.scope: deployment``): checked by a call of their own before admission.
    shared_provider: bool = False
    #: The provider-wide rate (``providers.NAME.rate_limit``), when the provider is shared.
    shared_provider_rate: Rate | None = None
    #: Runs of the tenant in flight at once, and how long a run stays in flight after its last
    #: step (its idle timeout, or ``DEFAULT_RUN_IDLE_S``).
    run_concurrency: int | None = None
    run_idle_ms: int = 0
    #: The run's wall-time limit and its grace (ms), measured from its first admitted step.
    wall_time_ms: int | None = None
    wall_time_grace_ms: int = 1000
    #: The run's cost at which its next actions are held for the reviewers (micro-USD).
    cost_alert_micro: int | None = None

    @cached_property
    def check_args(self) -> list[list[int | str]]:
        """The budget checks as the scripts take them (``budget_check_args``)."""
        return [
            budget_check_args(WINDOW_ORDER.index(c.period) + 1, c.kind, c.limit)
            for c in self.budget_checks
        ]

    @cached_property
    def check_json(self) -> str | None:
        """The budget checks as the scripts take them (one JSON text), or None without any."""
        return json.dumps(self.check_args, separators=(",", ":")) if self.budget_checks else None

    @cached_property
    def reserved_windows(self) -> list[int]:
        """The windows (1 run, 2 day, 3 month) that have a budget: estimates are reserved
        there, and nowhere else (a window without a budget has nothing to protect)."""
        return sorted({WINDOW_ORDER.index(c.period) + 1 for c in self.budget_checks})

    @classmethod
    def for_action(
        cls, tenant: TenantPolicy, action: Action, provider: ProviderSpec | None = None
    ) -> AdmissionLimits:
        """The limits of ``tenant`` that apply to ``action`` (provider rates for LLM calls;
        ``provider`` is the policy's entry of the call's provider)."""
        provider_rate = None
        shared = False
        shared_rate = None
        if isinstance(action, LLMCall):
            provider_rate = Rate.of(tenant.rate_limits.providers.get(action.provider))
            if provider is not None and provider.scope == "deployment":
                shared, shared_rate = True, Rate.of(provider.rate_limit)
        lr = tenant.long_running
        idle_s = lr.idle_timeout_s if lr.idle_timeout_s is not None else DEFAULT_RUN_IDLE_S
        return cls(
            run_concurrency=tenant.run_concurrency,
            run_idle_ms=round(idle_s * 1000),
            wall_time_ms=None if lr.max_wall_time_s is None else round(lr.max_wall_time_s * 1000),
            wall_time_grace_ms=round(lr.wall_time_grace_s * 1000),
            cost_alert_micro=None if lr.cost_alert_usd is None else usd_to_micro(lr.cost_alert_usd),
            shared_provider=shared,
            shared_provider_rate=shared_rate,
            concurrency=tenant.concurrency,
            tenant_rate=Rate.of(tenant.rate_limits.tenant),
            provider_rate=provider_rate,
            budget_checks=budget_checks(tenant),
            long_running=tenant.long_running,
            warning_threshold_pct=tenant.warning_threshold_pct,
            max_wait_ms=round(tenant.max_wait.total_seconds() * 1000),
        )


def usd_to_micro(usd: float) -> int:
    """USD as integer micro-dollars, so sums in Redis are exact."""
    return round(usd * 1_000_000)


def budget_checks(tenant: TenantPolicy) -> tuple[BudgetCheck, ...]:
    """Every configured budget limit (the run's cost alert is not one: it holds, see
    ``AdmissionLimits.cost_alert_micro``)."""
    checks: list[BudgetCheck] = []
    for budget in tenant.budgets:
        period = Period(str(budget.period))
        for kind in ("steps", "tool_calls", "tokens", "input_tokens", "output_tokens"):
            value = getattr(budget, kind)
            if value is not None:
                checks.append(BudgetCheck(period, kind, int(value)))
        if budget.cost_usd is not None:
            checks.append(BudgetCheck(period, "cost", usd_to_micro(budget.cost_usd)))
    return tuple(checks)
