"""Admission, lease renewal and settlement of governed tasks: one Lua call each.

``admit`` checks cooldown, rates, concurrency, long-running limits and budgets and, only if all
pass, takes a lease and reserves the task's estimated usage. ``settle`` releases the lease and
replaces the reservation with actual usage. Both are atomic and idempotent per task attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from governance.policy.actions import Action, LLMCall
from governance.policy.context import ActionContext
from governance.policy.limits import LimitWarning, Violation, ViolationType, Warning, check_limit
from governance.policy.usage import Usage
from governance.store.keys import WINDOW_ORDER, TenantKeys, WindowKeys
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate
from governance.store.state import StateStore


class AdmissionStatus(StrEnum):
    """What admission decided."""

    ADMITTED = "admitted"
    #: Another delivery of the same attempt holds a live lease: wait, never run it twice at once.
    IN_FLIGHT = "in_flight"
    #: The same attempt was already admitted and settled: its body must not run again.
    SETTLED = "settled"
    #: Over a limit that frees up with time (rate, concurrency, cooldown, reservations in flight).
    DEFERRED = "deferred"
    #: Over a limit that waiting does not fix in this period (budget exhausted, loop, depth...).
    REJECTED = "rejected"


@dataclass(frozen=True)
class AdmissionTicket:
    """What settlement and renewal need to find the task's lease and reservations again."""

    tenant: str
    task_id: str
    attempt: int
    holder: str
    windows: tuple[WindowKeys, ...]
    checks: tuple[BudgetCheck, ...]
    warning_threshold_pct: int


@dataclass(frozen=True)
class Admission:
    """The outcome of one admission call."""

    status: AdmissionStatus
    ticket: AdmissionTicket
    violation: Violation | None = None
    wait_ms: int = 0
    lease_expiry_ms: int = 0
    warnings: tuple[LimitWarning, ...] = ()

    @property
    def admitted(self) -> bool:
        """True when the task may run now."""
        return self.status is AdmissionStatus.ADMITTED


@dataclass(frozen=True)
class Settlement:
    """The outcome of one settlement: whether it counted, and thresholds crossed by it.

    ``late`` means this holder had lost its lease to another delivery of the same attempt: its
    usage was counted, the other delivery's lease and reservation were left alone.
    """

    settled: bool
    late: bool = False
    warnings: tuple[LimitWarning, ...] = field(default=())


def _micro_to_usd(value: float) -> float:
    return value / 1_000_000


def _violation(check: BudgetCheck, current: float, limit: float) -> Violation:
    if check.kind == "cost":
        return Violation(check.violation_type, _micro_to_usd(current), _micro_to_usd(limit))
    return Violation(check.violation_type, int(current), int(limit))


def _warning(check: BudgetCheck, current: float, threshold_pct: int) -> LimitWarning | None:
    scale = _micro_to_usd if check.kind == "cost" else float
    result = check_limit(
        check.violation_type,
        scale(current),
        scale(check.limit),
        warning_threshold_pct=threshold_pct,
    )
    return result.warning if isinstance(result, Warning) else None


def _percent(value: float, limit: int) -> float:
    return float("inf") if limit == 0 else value * 100.0 / limit


class Admitter:
    """Admission, renewal and settlement against one Redis (or Redis Cluster)."""

    def __init__(self, state: StateStore) -> None:
        self._state = state

    def admit(
        self,
        *,
        ctx: ActionContext,
        action: Action,
        task_id: str,
        attempt: int,
        estimate: Usage,
        limits: AdmissionLimits,
        holder: str = "",
        now: datetime | None = None,
    ) -> Admission:
        """Admit one attempt of one task, or say which limit blocks it and how long to wait.

        ``holder`` identifies this delivery of the task (a fresh id per execution): asking again
        with the same holder is idempotent, another holder of the same attempt waits.
        """
        holder = holder or f"{task_id}:{attempt}"
        keys = TenantKeys(ctx.tenant)
        windows = tuple(keys.windows(ctx.run, now))
        provider = action.provider if isinstance(action, LLMCall) else None
        lr = limits.long_running
        ttl = self._state.ttl
        argv: list[str | int | float] = [
            task_id,
            attempt,
            self._state.lease_ms,
            -1 if limits.concurrency is None else limits.concurrency,
            self._state.retry_hint_ms,
            1 if provider else 0,
            *_rate_args(limits.tenant_rate),
            *_rate_args(limits.provider_rate if provider else None),
            estimate.steps,
            estimate.tool_calls,
            estimate.input_tokens,
            estimate.output_tokens,
            estimate.cost_micro_usd,
            ctx.discovery_depth,
            _or_minus_one(lr.max_discovery_depth),
            _or_minus_one(lr.max_discovered_steps),
            -1 if lr.idle_timeout_s is None else round(lr.idle_timeout_s * 1000),
            _or_minus_one(lr.max_same_step_repetitions),
            f"{action.name}:{action.input_hash()}",
            ttl.run_s,
            ttl.day_s,
            ttl.month_s,
            ttl.task_s,
            holder,
            len(limits.budget_checks),
        ]
        for check in limits.budget_checks:
            argv += [WINDOW_ORDER.index(check.period) + 1, check.kind, check.limit]
        script_keys = [
            keys.leases,
            keys.task(task_id),
            keys.cooldown(provider) if provider else keys.placeholder,
            keys.tenant_rate,
            keys.provider_rate(provider) if provider else keys.placeholder,
            *(k for w in windows for k in w.as_list()),
            keys.step_repetitions(ctx.run),
        ]
        reply = self._state.call_packed("admission", self._state.scripts.admit, script_keys, argv)
        ticket = AdmissionTicket(
            tenant=ctx.tenant,
            task_id=task_id,
            attempt=attempt,
            holder=holder,
            windows=windows,
            checks=limits.budget_checks,
            warning_threshold_pct=limits.warning_threshold_pct,
        )
        return _parse_admission(reply, ticket, limits, provider)

    def renew(self, ticket: AdmissionTicket) -> int:
        """Extend the task's lease; returns the new expiry (ms), or 0 if the lease was lost."""
        keys = TenantKeys(ticket.tenant)
        script_keys = [
            keys.leases,
            keys.task(ticket.task_id),
            ticket.windows[0].usage,
            *(w.reservation_expiry for w in ticket.windows),
        ]
        argv: list[str | int | float] = [
            ticket.task_id,
            ticket.attempt,
            self._state.lease_ms,
            ticket.holder,
        ]
        return int(
            self._state.call_packed("lease renewal", self._state.scripts.renew, script_keys, argv)
        )

    def settle(self, ticket: AdmissionTicket, actual: Usage) -> Settlement:
        """Release the lease and count ``actual`` instead of the reservation (at most once)."""
        keys = TenantKeys(ticket.tenant)
        ttl = self._state.ttl
        argv: list[str | int] = [
            ticket.task_id,
            ticket.attempt,
            actual.steps,
            actual.tool_calls,
            actual.input_tokens,
            actual.output_tokens,
            actual.cost_micro_usd,
            ttl.run_s,
            ttl.day_s,
            ttl.month_s,
            ticket.holder,
            len(ticket.checks),
        ]
        for check in ticket.checks:
            argv += [WINDOW_ORDER.index(check.period) + 1, check.kind]
        script_keys = [
            keys.leases,
            keys.task(ticket.task_id),
            *(k for w in ticket.windows for k in w.as_list()),
        ]
        reply = self._state.call_packed("settlement", self._state.scripts.settle, script_keys, argv)
        outcome = _text(reply[0])
        if outcome == "noop":
            return Settlement(settled=False)
        warnings = []
        for i, check in enumerate(ticket.checks):
            before, after = float(reply[1 + 2 * i]), float(reply[2 + 2 * i])
            crossed = (
                _percent(before, check.limit)
                < ticket.warning_threshold_pct
                <= _percent(after, check.limit)
            )
            warning = _warning(check, after, ticket.warning_threshold_pct) if crossed else None
            if warning is not None:
                warnings.append(warning)
        return Settlement(settled=True, late=outcome == "late", warnings=tuple(warnings))


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def _rate_args(rate: Rate | None) -> tuple[float, int]:
    return (0, 0) if rate is None else (rate.interval_ms, rate.burst)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_admission(
    reply: Sequence[bytes | str],
    ticket: AdmissionTicket,
    limits: AdmissionLimits,
    provider: str | None,
) -> Admission:
    status = AdmissionStatus(_text(reply[0]))
    name, current, limit = _text(reply[1]), _text(reply[2]), _text(reply[3])
    wait_ms, lease_expiry, check_index = int(reply[4]), int(reply[5]), int(reply[6])
    check_values = [float(_text(v)) for v in reply[7:]]
    warnings = tuple(
        w
        for check, value in zip(limits.budget_checks, check_values, strict=False)
        if (w := _warning(check, value, limits.warning_threshold_pct)) is not None
    )
    violation: Violation | None = None
    if status is AdmissionStatus.IN_FLIGHT:
        violation = Violation(
            ViolationType.concurrency_limit,
            2,
            1,
            message=f"attempt {ticket.attempt} of task {ticket.task_id} is already running "
            "under another delivery; waiting for it to finish or for its lease to expire",
        )
    elif status in (AdmissionStatus.DEFERRED, AdmissionStatus.REJECTED):
        if check_index > 0:
            violation = _violation(
                limits.budget_checks[check_index - 1], float(current), float(limit)
            )
        elif name == "cooldown":
            violation = Violation(
                ViolationType.cooldown,
                wait_ms,
                0,
                message=f"cooldown: provider {provider!r} asked to wait (Retry-After); "
                f"{wait_ms} ms left",
            )
        elif name.startswith("rate_limit:"):
            scope = name.split(":", 1)[1]
            rate = limits.tenant_rate if scope == "tenant" else limits.provider_rate
            what = f"tenant {ticket.tenant!r}" if scope == "tenant" else f"provider {provider!r}"
            described = rate.describe() if rate else "?"
            violation = Violation(
                ViolationType.rate_limit,
                int(limit) + 1,
                int(limit),
                message=(
                    f"rate_limit exceeded: {what} allows {described}; next slot in {wait_ms} ms"
                ),
            )
        else:
            violation = Violation(ViolationType(name), _number(current), _number(limit))
    return Admission(
        status=status,
        ticket=ticket,
        violation=violation,
        wait_ms=wait_ms,
        lease_expiry_ms=lease_expiry,
        warnings=warnings if status is AdmissionStatus.ADMITTED else (),
    )


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value
