"""The open tasks of tenants removed from the policy: the maintenance leader's round, and the
ending that ``govctl tenants end`` asks for now.

The store keeps the registry and does the work in the tenant's slot (``store.removed``); this
module decides when: every few seconds the leader compares the registry with the policy, notices
each removed tenant that still has open tasks (their grace starts: the tenant's ``max_wait``),
ends them once the grace is over (publishing what must end on a worker, ending held tasks as
rejected), unmarks a removed tenant with nothing open, and lets a tenant that is back go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.policy.tenant import DEFAULT_MAX_WAIT
from governance.store.removed import REMOVED_REASON, RemovedTenant

log = logging.getLogger(__name__)

#: Walks of one tenant's ledger per round at most (each moves up to the sweep limit).
WALKS_PER_ROUND = 20


def removal_grace_ms(runtime: GovernanceRuntime, max_wait_ms: int | None) -> int:
    """How long a removed tenant's tasks wait for it to come back: its ``max_wait`` as the last
    policy that named it said, else the current policy's default."""
    if max_wait_ms is not None:
        return max_wait_ms
    default = runtime.policy.config.defaults.max_wait or DEFAULT_MAX_WAIT
    return round(default.total_seconds() * 1000)


def register_policy_tenants(runtime: GovernanceRuntime) -> None:
    """Record the tenants the policy in force names, with their max_wait (a worker loaded it)."""
    policy = runtime.policy
    runtime.removed_tenants.register(
        {
            name: round(tenant.max_wait.total_seconds() * 1000)
            for name in policy.tenant_names
            if (tenant := policy.tenant(name)) is not None
        }
    )


@dataclass(frozen=True)
class Ended:
    """What one ending of a removed tenant's tasks did."""

    tenant: str
    #: Tasks published for their own delivery to end them.
    published: int
    #: Held tasks ended (rejected, with the reason).
    held: int
    #: Ledger entries still open (running tasks finish; queued ones end at their delivery).
    open: int


def end_tasks(app: Any, runtime: GovernanceRuntime, tenant: str) -> Ended:
    """End ``tenant``'s open tasks now that its grace is over: its held tasks (rejected, with
    the reason), then a bounded number of walks of its ledger; the rest is the next round's."""
    reviewers = Reviewers(app, runtime)
    held = len(reviewers.end_held(tenant, reviewers.store.held_ids(tenant), REMOVED_REASON))
    removed = runtime.removed_tenants
    cursor, published, still_open = "0", 0, 0
    for _ in range(WALKS_PER_ROUND):
        walk = removed.end(tenant, cursor)
        published += len(runtime.publish_each(walk.publish))
        cursor, still_open = walk.cursor, walk.open
        if cursor == "0":
            break
    runtime.audit_log.flush(tenant)
    return Ended(tenant, published, held, still_open)


class RemovedTenantSweep:
    """The leader's round over tenants removed from the policy (see the module)."""

    def __init__(self, app: Any, runtime: GovernanceRuntime) -> None:
        self._app = app
        self._runtime = runtime

    def round(self) -> list[RemovedTenant]:
        """One round; every known tenant the policy no longer names (their chains are
        checkpointed with the policy's tenants')."""
        runtime = self._runtime
        removed = runtime.removed_tenants
        in_policy = set(runtime.policy.tenant_names)
        for back in removed.marked() & in_policy:
            removed.restore(back)
            runtime.audit_log.flush(back)
            log.warning("tenant %r is in the policy again: its parked tasks go on", back)
        now_ms = int(time.time() * 1000)
        listed = removed.removed(in_policy)
        for tenant in listed:
            if tenant.open == 0 and tenant.held == 0:
                if tenant.ends_at_ms is not None:
                    removed.unmark(tenant.tenant)
                continue
            if tenant.ends_at_ms is None:
                grace_ms = removal_grace_ms(runtime, tenant.max_wait_ms)
                until = removed.notice(tenant.tenant, grace_ms)
                runtime.audit_log.flush(tenant.tenant)
                log.warning(
                    "tenant %r is not in the policy and has %d open task(s): they end in %d s "
                    "unless it comes back (govctl tenants end %s ends them now)",
                    tenant.tenant,
                    tenant.open,
                    max(0, (until - now_ms) // 1000),
                    tenant.tenant,
                )
            elif now_ms >= tenant.ends_at_ms:
                end_tasks(self._app, runtime, tenant.tenant)
        return listed
