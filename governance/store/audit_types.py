"""What an audit entry is: its types and its fields, declared once.

A leaf module (it imports nothing of the store): :mod:`governance.store.audit` re-exports these
names, and :mod:`governance.store.vocabulary` gives them to the Lua scripts, which write most
entries (``AT.<type>`` in their source).
"""

from __future__ import annotations

from enum import StrEnum

#: Fields an audit event may carry (besides ``seq`` and ``ts``, which the chain assigns).
ENTRY_FIELDS = (
    "type",
    "tenant",
    "agent",
    "run",
    "task_id",
    "action",
    "decision",
    "reason",
    "tier",
    "policy_version",
    "reviewer",
    "detail",
)

#: The fields every entry about one task shares (its "audit template"), which the scripts take
#: with a request and complete with the entry's own type, decision, reason and detail.
TEMPLATE_FIELDS = tuple(
    f for f in ENTRY_FIELDS if f not in ("type", "decision", "reason", "detail")
)

#: The type of the stream entries that carry seals (not a decision: see ``audit_seal``).
SEAL_TYPE = "seal"


class AuditEventType(StrEnum):
    """Every kind of decision or step that leaves an audit entry."""

    AUTHORIZATION_DENIED = "authorization_denied"
    HELD = "held"
    APPROVED = "approved"  # one reviewer's approval, before the quorum is reached
    RELEASED = "released"
    REJECTED = "rejected"
    EXPIRED = "expired"
    FORGED_RELEASE = "forged_release"
    RELEASE_EXPIRED = "release_expired"  # genuine approvals, older than approval.valid_for
    RELEASE_REPLAYED = "release_replayed"  # a copy of a release whose task ended: dropped
    HELD_TAMPERED = "held_tampered"  # a held record that disagrees with its message: refused
    SECRET_REVEALED = "secret_revealed"  # a held call's secret-named values shown in full
    TENANT_PAUSED = "tenant_paused"  # an operator paused a tenant: nothing of it starts
    TENANT_RESUMED = "tenant_resumed"
    LIMITS_OVERRIDDEN = "limits_overridden"  # a concurrency or weight set for a while
    #: A tenant with open tasks is no longer in the policy: they end after a grace unless it
    #: comes back (or at once: ``govctl tenants end``).
    TENANT_REMOVED = "tenant_removed"
    TENANT_RESTORED = "tenant_restored"  # back in the policy before its tasks ended
    SUGGESTED = "suggested"
    SHADOWED = "shadowed"
    WAITING = "waiting"  # the first time an attempt waits (capacity, a rate turn, a cooldown)
    ADMITTED = "admitted"
    BUDGET_WARNING = "budget_warning"
    LIMIT_WARNING = "limit_warning"  # a run's wall time at the warning threshold (once per run)
    RUN_CLOSED = "run_closed"  # closed explicitly (govctl run close): its run slot is free
    TASK_FINISHED = "task_finished"
    TASK_FAILED = "task_failed"
    RETRY_SCHEDULED = "retry_scheduled"
    TASK_REVOKED = "task_revoked"  # revoked or expired: dropped by Celery, never run
    TASK_LOST = "task_lost"
    GRANT_CREATED = "grant_created"
    GRANT_REVOKED = "grant_revoked"
    NOTIFY_FAILED = "notify_failed"
    POLICY_RELOADED = "policy_reloaded"  # a worker enforces a changed policy file
    POLICY_INVALID = "policy_invalid"  # a worker found the changed file invalid: nothing changed
    #: The maintenance leader found the chain ending before an entry it had seen (entries cut and
    #: the counter reset, or lost by the state Redis): ``govctl audit verify`` reports it.
    AUDIT_ROLLED_BACK = "audit_rolled_back"
