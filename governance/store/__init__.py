"""The store layer: the only code that talks to Redis.

Every multi-step check is one Lua script (admission, settlement, the reconciler's sweep, renewal,
cooldown, audit append, held-task decisions), every key is named in
:mod:`governance.store.keys`, and every Redis failure surfaces as :class:`StoreUnavailable` so
callers fail closed.
"""

from governance.store.admission import (
    Admission,
    AdmissionStatus,
    AdmissionTicket,
    Admitter,
    NextAttempt,
    Publication,
    Settlement,
)
from governance.store.audit import AuditEntry, AuditEvent, AuditEventType, AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.audit_verify import VerifyReport, verify
from governance.store.connection import connect
from governance.store.cooldown import cooldown_remaining_ms, set_cooldown
from governance.store.errors import StoreUnavailable
from governance.store.keys import Period, TenantKeys
from governance.store.ledger import Ledger, TenantStatus
from governance.store.limits import AdmissionLimits, BudgetCheck, Rate
from governance.store.state import KeyTTL, LedgerTimings, StateStore
from governance.store.usage import UsageSnapshot, long_running_checks, read_usage

__all__ = [
    "Admission",
    "AdmissionLimits",
    "AdmissionStatus",
    "AdmissionTicket",
    "Admitter",
    "AuditEntry",
    "AuditEvent",
    "AuditEventType",
    "AuditLog",
    "AuditSealer",
    "BudgetCheck",
    "KeyTTL",
    "Ledger",
    "LedgerTimings",
    "NextAttempt",
    "Period",
    "Publication",
    "Rate",
    "Settlement",
    "StateStore",
    "StoreUnavailable",
    "TenantKeys",
    "TenantStatus",
    "UsageSnapshot",
    "VerifyReport",
    "connect",
    "cooldown_remaining_ms",
    "long_running_checks",
    "read_usage",
    "set_cooldown",
    "verify",
]
