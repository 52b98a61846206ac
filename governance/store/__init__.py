"""The store layer: the only code that talks to Redis.

Every multi-step check is one Lua script (admission, settlement, the reconciler's sweep, renewal,
cooldown, audit append, held-task decisions), every key is named in
:mod:`governance.store.keys`, what the scripts take and do is declared in
:mod:`governance.store.vocabulary`, and every Redis failure surfaces as
:class:`StoreUnavailable` so callers fail closed.

Exported here is what a user of the library needs: a client for the state store, its failure,
usage snapshots, and the audit log (reading, verifying). The machinery the integration layer
drives (``Admitter``, ``Ledger``, ``AuditSealer``, ...) is imported from its module
(``governance.store.admission``, ...). The names this package exported before are still
importable from it for one release (see ``_MOVED``).
"""

from importlib import import_module
from typing import Any

from governance.store.audit import AuditEntry, AuditEvent, AuditEventType, AuditLog
from governance.store.audit_verify import VerifyReport, verify
from governance.store.connection import connect
from governance.store.errors import StoreUnavailable
from governance.store.keys import Period
from governance.store.state import StateStore
from governance.store.usage import UsageSnapshot, read_usage

__all__ = [
    "AuditEntry",
    "AuditEvent",
    "AuditEventType",
    "AuditLog",
    "Period",
    "StateStore",
    "StoreUnavailable",
    "UsageSnapshot",
    "VerifyReport",
    "connect",
    "read_usage",
    "verify",
]

#: Names this package exported until it exported only the above, and the module each lives in:
#: importable from here for one release, then only from their modules.
_MOVED = {
    "Admission": "admission",
    "AdmissionStatus": "admission",
    "AdmissionTicket": "admission",
    "Admitter": "admission",
    "NextAttempt": "admission",
    "Publication": "admission",
    "Settlement": "admission",
    "AuditSealer": "audit_seal",
    "cooldown_remaining_ms": "cooldown",
    "set_cooldown": "cooldown",
    "TenantKeys": "keys",
    "Ledger": "ledger",
    "TenantStatus": "ledger",
    "AdmissionLimits": "limits",
    "BudgetCheck": "limits",
    "Rate": "limits",
    "KeyTTL": "state",
    "LedgerTimings": "state",
    "long_running_checks": "usage",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"governance.store.{module}"), name)
