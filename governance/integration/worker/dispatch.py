"""Fair dispatch, done by the workers: when capacity frees in a saturated pool, it goes to the
tenant furthest below its weighted fair share.

After a settlement of a task of a saturated pool (or of any task fair dispatch handed on), the
worker that settled it makes the pool's call (:meth:`governance.store.pool.Pools.dispatch`: what
ended and what it cost, whose tasks wait, and who is given the capacity), then the given
tenant's call (:meth:`governance.store.ledger.Ledger.dispatch`: its oldest waiting tasks that fit
its own limits, handed on with a grant each), and publishes them. Grants a tenant cannot use go
back with the next pool call, which gives them to the next tenant: at most ``ROUNDS`` rounds.
The maintenance leader runs the same rounds now and then for each saturated pool, so capacity
that frees without a settlement (a worker joins, a grant expires) is not left idle.

While the pool is not saturated, none of this happens: a task's admission and settlement are the
same two calls as without fair dispatch.
"""

from __future__ import annotations

import logging

from governance.integration.runtime import GovernanceRuntime
from governance.policy.actions import Action, ToolCall
from governance.policy.usage import Usage
from governance.store.errors import StoreUnavailable
from governance.store.pool import Completion, Grant, Returned

log = logging.getLogger("governance.fairness")

#: Pool and tenant calls one dispatch makes at most (a tenant that cannot use its grants passes
#: them on to the next).
ROUNDS = 4


def dispatch(
    runtime: GovernanceRuntime,
    queue: str,
    *,
    completed: Completion | None = None,
    register: tuple[str, float] | None = None,
    give: bool = True,
) -> int:
    """One dispatch on ``queue``'s pool: note ``completed`` and a tenant that waits
    (``register``), give freed capacity (with ``give``), hand it on and publish; returns how
    many tasks were handed on. Failures are logged: the maintenance leader dispatches again."""
    view = runtime.pool_view
    pools = view.pools
    handed = 0
    try:
        grant = pools.dispatch(
            queue,
            completed=completed,
            register=[register] if register else (),
            give=give,
        )
        for _ in range(ROUNDS):
            view.noted(queue, grant.saturated)
            if grant.tenant is None or not grant.grants:
                break
            used, returned = _hand_on(runtime, queue, grant)
            handed += used
            if returned is None:
                break
            grant = pools.dispatch(queue, returned=returned, give=True)
    except StoreUnavailable as exc:
        log.warning("fair dispatch on %s failed (the leader tries again): %s", queue, exc)
    return handed


def _hand_on(runtime: GovernanceRuntime, queue: str, grant: Grant) -> tuple[int, Returned | None]:
    """The given tenant hands its grants to its oldest waiting tasks of ``queue``; what it
    could not use."""
    assert grant.tenant is not None
    result = runtime.ledger.dispatch(
        grant.tenant, grant.grants, queue=queue, policy_version=runtime.policy.version
    )
    runtime.publish_each(result.publish)
    if result.used == len(grant.grants):
        return result.used, None
    unused = grant.grants[result.used :]
    done = result.left == 0 or result.blocked
    return result.used, Returned(
        grant.tenant, unused, done, blocked=result.blocked and result.left > 0
    )


def completion(
    runtime: GovernanceRuntime,
    tenant: str,
    action: Action,
    usage: Usage,
    run_ms: float,
    grant: str,
) -> Completion:
    """What a settled task is charged (``fairness.by``: its worker time, 1, or its tokens)."""
    cost = runtime.pool_view.fairness.cost(
        run_ms=run_ms, tokens=usage.tokens, tool_call=isinstance(action, ToolCall)
    )
    return Completion(tenant, cost, run_ms, grant)
