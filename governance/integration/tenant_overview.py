"""What operators see per tenant, in one place: ``govctl status``, the metrics exporter and the
tenants page beside Flower all show these same figures.

Per tenant of the policy: its running and waiting tasks, the oldest wait, the ledger's open and
overdue entries, its re-publications, its worker time over the last minute and its share of the
pool's (the sum over the tenants shown), its weight (an operator's override while it lasts) and
whether it is paused. Then the tenants removed from the policy that still have open tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from governance.integration.runtime import GovernanceRuntime
from governance.store.control import Controls
from governance.store.removed import RemovedTenant


@dataclass(frozen=True)
class TenantOverview:
    """One tenant's row."""

    tenant: str
    running: int
    waiting: int
    oldest_wait_s: float | None
    open: int
    overdue: int
    republished: int
    worker_s_last_minute: float
    #: Its part of the worker time of the tenants shown, over the last minute (0..1).
    share_last_minute: float
    weight: float
    weight_overridden: bool
    concurrency_override: int | None
    paused: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def tenant_overview(
    runtime: GovernanceRuntime, names: Iterable[str] | None = None
) -> list[TenantOverview]:
    """The rows of ``names`` (default: every tenant of the policy), read from the state."""
    policy = runtime.policy
    chosen = list(policy.tenant_names if names is None else names)
    overdue_after_ms = round(runtime.settings.reconcile_after_s * 1000)
    controls = Controls(runtime.state, runtime.audit_log)
    raw = []
    for name in chosen:
        status = runtime.ledger.status(name, overdue_after_ms=overdue_after_ms)
        control = controls.read(name)
        tenant_policy = policy.tenant(name)
        raw.append((status, control, tenant_policy.weight if tenant_policy else 1.0, name))
    total_ms = sum(status.worker_ms_last_minute for status, *_ in raw)
    return [
        TenantOverview(
            tenant=name,
            running=status.running,
            waiting=status.waiting,
            oldest_wait_s=None if status.oldest_wait_ms is None else status.oldest_wait_ms / 1000,
            open=status.open,
            overdue=status.overdue,
            republished=runtime.ledger.republished(name),
            worker_s_last_minute=round(status.worker_ms_last_minute / 1000, 3),
            share_last_minute=(
                round(status.worker_ms_last_minute / total_ms, 3) if total_ms else 0.0
            ),
            weight=control.weight or policy_weight,
            weight_overridden=control.weight is not None,
            concurrency_override=control.concurrency,
            paused=status.paused,
        )
        for status, control, policy_weight, name in raw
    ]


def removed_with_open_tasks(runtime: GovernanceRuntime) -> list[RemovedTenant]:
    """Tenants removed from the policy that still have open or held tasks."""
    removed = runtime.removed_tenants.removed(runtime.policy.tenant_names)
    return [r for r in removed if r.open or r.held]
