"""Every Redis key the governance layer uses, named in one place.

All keys of one tenant carry the tenant as a hash tag (``gov:{tenant}:...``), so every Lua script,
which only ever touches the keys of one tenant, runs unchanged on Redis Cluster. Deployment-wide
keys (the audit log) use their own hash tag. Nothing else in the code base builds a key string.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

PREFIX = "gov"


class Period(StrEnum):
    """A budget/usage window: one agent run, a UTC calendar day, or a UTC calendar month."""

    RUN = "run"
    DAY = "day"
    MONTH = "month"


#: Window order used by the Lua scripts (1-based in Lua): run, day, month.
WINDOW_ORDER: tuple[Period, ...] = (Period.RUN, Period.DAY, Period.MONTH)


def period_label(period: Period, run: str, now: datetime | None = None) -> str:
    """The label of the window that ``now`` falls in: the run id, ``2026-11-21`` or ``2026-11``."""
    if period is Period.RUN:
        return run
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%d") if period is Period.DAY else moment.strftime("%Y-%m")


@dataclass(frozen=True)
class WindowKeys:
    """The three keys of one usage window: counters, per-task reservations, reservation expiry."""

    usage: str
    reservations: str
    reservation_expiry: str

    def as_list(self) -> list[str]:
        return [self.usage, self.reservations, self.reservation_expiry]


class TenantKeys:
    """Key names for one tenant; every one of them hashes to the tenant's cluster slot."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self._base = f"{PREFIX}:{{{tenant}}}"

    @property
    def leases(self) -> str:
        """Sorted set of running tasks: member = task id, score = lease expiry (ms)."""
        return f"{self._base}:leases"

    def task(self, task_id: str) -> str:
        """Hash recording a task's admission (attempt, state, reservation) for idempotency."""
        return f"{self._base}:task:{task_id}"

    @property
    def tenant_rate(self) -> str:
        """GCRA theoretical arrival time of the tenant-wide rate limit."""
        return f"{self._base}:rate"

    def provider_rate(self, provider: str) -> str:
        """GCRA theoretical arrival time of the tenant's rate limit for one provider."""
        return f"{self._base}:rate:provider:{provider}"

    def cooldown(self, provider: str) -> str:
        """Time (ms) until which the provider must not be called for this tenant (Retry-After)."""
        return f"{self._base}:cooldown:{provider}"

    @property
    def placeholder(self) -> str:
        """A key in the tenant's slot passed where a script needs no real key (never written)."""
        return f"{self._base}:unused"

    def window(self, period: Period, label: str) -> WindowKeys:
        base = f"{self._base}:usage:{period.value}:{label}"
        return WindowKeys(usage=base, reservations=f"{base}:resv", reservation_expiry=f"{base}:exp")

    def windows(self, run: str, now: datetime | None = None) -> list[WindowKeys]:
        """The run, day and month windows that a task of ``run`` counts in at ``now``."""
        return [self.window(p, period_label(p, run, now)) for p in WINDOW_ORDER]

    def held(self, task_id: str) -> str:
        """Hash of one held (approval-tier) or suggested task: the call, its status, decisions."""
        return f"{self._base}:held:{task_id}"

    def held_by_status(self, status: str) -> str:
        """Sorted set of the tenant's held tasks in one status, scored by request time (ms)."""
        return f"{self._base}:held-status:{status}"

    @property
    def held_unpublished(self) -> str:
        """Set of released tasks not yet confirmed published again (retried by the sweep)."""
        return f"{self._base}:held-unpublished"

    @property
    def held_expiry(self) -> str:
        """Sorted set of the tenant's tasks still held, scored by expiry time (ms)."""
        return f"{self._base}:held-expiry"

    @property
    def grants(self) -> str:
        """Hash of grants given by reviewers: grant id -> grant (JSON)."""
        return f"{self._base}:grants"

    def step_repetitions(self, run: str) -> str:
        """Hash of a run: input hash of a step -> how many times that exact step was admitted."""
        return f"{self._base}:steps:{run}"


class DeploymentKeys:
    """Keys shared by the whole deployment; each group shares one hash tag."""

    audit_stream = f"{PREFIX}:{{audit}}:stream"
    audit_head = f"{PREFIX}:{{audit}}:head"
    parked_due = f"{PREFIX}:{{parking}}:due"
    parked_claimed = f"{PREFIX}:{{parking}}:claimed"
    parked_messages = f"{PREFIX}:{{parking}}:messages"
    held_tenants = f"{PREFIX}:{{held}}:tenants"
