"""Everything a process needs to govern tasks: settings, the policy, and Redis-backed state.

One :class:`GovernanceRuntime` per Celery app, attached by :func:`install`. The Redis client is
created lazily and again after a fork (prefork pool children must not share the parent's
sockets), so importing the app never connects anywhere.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import replace
from typing import Any

from governance.integration.leases import LeaseKeeper
from governance.policy.actions import Action, LLMCall
from governance.policy.engine import Policy
from governance.policy.tenant import TenantPolicy
from governance.settings import GovernanceSettings
from governance.store.admission import AdmissionTicket, Admitter
from governance.store.audit import AuditEvent, AuditLog
from governance.store.connection import connect
from governance.store.errors import StoreUnavailable
from governance.store.limits import AdmissionLimits
from governance.store.parking import ParkingLot
from governance.store.state import StateStore

log = logging.getLogger("governance")

_RUNTIMES: weakref.WeakKeyDictionary[Any, GovernanceRuntime] = weakref.WeakKeyDictionary()


class GovernanceRuntime:
    """The policy, settings and state of one app, in one process."""

    def __init__(self, settings: GovernanceSettings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._state: StateStore | None = None
        self._admitter: Admitter | None = None
        self._audit: AuditLog | None = None
        self._parking: ParkingLot | None = None
        self.leases = LeaseKeeper(self._renew, settings.heartbeat_interval_s)
        self._limits: dict[tuple[str, str | None], AdmissionLimits] = {}

    def limits_for(self, tenant: TenantPolicy, action: Action) -> AdmissionLimits:
        """The admission limits of ``tenant`` for ``action`` (cached: the policy is immutable)."""
        key = (tenant.name, action.provider if isinstance(action, LLMCall) else None)
        limits = self._limits.get(key)
        if limits is None:
            limits = self._limits[key] = AdmissionLimits.for_action(tenant, action)
        return limits

    def _renew(self, ticket: AdmissionTicket) -> int:
        return self.admitter.renew(ticket)

    def _ensure(self) -> StateStore:
        pid = os.getpid()
        if self._state is not None and self._pid == pid:
            return self._state
        with self._lock:
            if self._state is None or self._pid != pid:
                client = connect(
                    self.settings.state_url,
                    cluster=self.settings.state_redis_cluster,
                    timeout_s=self.settings.state_timeout_s,
                )
                state = StateStore(client, lease_ms=self.settings.lease_ms)
                self._admitter = Admitter(state)
                self._audit = AuditLog(
                    state,
                    self.settings.audit_key.get_secret_value().encode(),
                    maxlen=self.settings.audit_maxlen,
                )
                self._parking = ParkingLot(state)
                self._state, self._pid = state, pid
        return self._state

    @property
    def state(self) -> StateStore:
        return self._ensure()

    @property
    def admitter(self) -> Admitter:
        self._ensure()
        assert self._admitter is not None
        return self._admitter

    @property
    def audit_log(self) -> AuditLog:
        self._ensure()
        assert self._audit is not None
        return self._audit

    @property
    def parking(self) -> ParkingLot:
        self._ensure()
        assert self._parking is not None
        return self._parking

    def audit(self, *events: AuditEvent, required: bool = False) -> None:
        """Append audit events. When ``required``, a Redis failure propagates (fail closed);
        otherwise it is logged, because the action it describes already happened."""
        stamped = [e if e.policy_version else _with_version(e, self.policy.version) for e in events]
        try:
            self.audit_log.append(*stamped)
        except StoreUnavailable:
            if required:
                raise
            log.exception("audit events could not be written: %s", [e.type for e in events])


def _with_version(event: AuditEvent, version: str) -> AuditEvent:
    return replace(event, policy_version=version)


def install(app: Any, runtime: GovernanceRuntime) -> GovernanceRuntime:
    """Attach ``runtime`` to a Celery app; governed tasks of that app find it there."""
    _RUNTIMES[app] = runtime
    from governance.integration import signals

    signals.connect(app)
    return runtime


def runtime_for(app: Any) -> GovernanceRuntime:
    """The runtime installed on ``app``; a clear error when the app was never set up."""
    try:
        return _RUNTIMES[app]
    except KeyError:
        raise RuntimeError(
            f"Celery app {getattr(app, 'main', app)!r} has no governance runtime: call "
            "governance.integration.install(app, GovernanceRuntime(settings, policy)) when the "
            "app is created"
        ) from None
