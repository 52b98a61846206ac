"""Everything a process needs to govern tasks: settings, the policy, and Redis-backed state.

One :class:`GovernanceRuntime` per Celery app, attached by
:func:`~governance.integration.setup.install`. The Redis client is created lazily and again
after a fork (prefork pool children must not share the parent's sockets), so importing the app
never connects anywhere.

This is the floor of the integration layer: the publisher, the worker and the approvals wings
all use it, and it imports none of them (the wiring of an app is in
:mod:`governance.integration.setup`).
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from governance import forksafe
from governance.integration.durable import Confirmations
from governance.integration.headers import HANDOFF
from governance.integration.ignored import IgnoredDeliveries
from governance.integration.leases import LeaseKeeper
from governance.integration.messages import Envelope, RawSend, publish
from governance.integration.monitor import EventsSwitch
from governance.integration.policy_watch import WatchedPolicy
from governance.integration.pool_view import PoolView
from governance.integration.store_health import StoreHealth
from governance.integration.unsettled import UnsettledAttempts
from governance.policy.actions import Action, LLMCall
from governance.policy.engine import Policy
from governance.policy.tenant import TenantPolicy
from governance.settings import GovernanceSettings, StateDurability
from governance.store.admission import AdmissionTicket, Admitter, Publication
from governance.store.audit import AuditEvent, AuditLog, chain_for
from governance.store.audit_seal import AuditSealer
from governance.store.connection import connect
from governance.store.durability import Durability, DurabilityRule, NotDurable, Verdict
from governance.store.errors import StoreUnavailable
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits
from governance.store.removed import RemovedTenants
from governance.store.state import LedgerTimings, StateStore

log = logging.getLogger("governance")

_RUNTIMES: weakref.WeakKeyDictionary[Any, GovernanceRuntime] = weakref.WeakKeyDictionary()

#: How long the seals of a chain may wait for a call to carry them before they are flushed.
SEAL_FLUSH_S = 0.25


_warned_secrets: set[str] = set()


def warn_development_secrets(settings: GovernanceSettings) -> None:
    """Log, once per process and loudly, every secret left at its development default.

    Anyone who has read this project's source knows that default: with it, whoever can write
    Redis can forge audit entries that verify. ``GOVERNANCE_REQUIRE_SECRETS=1`` turns this
    warning into a refusal to start.
    """
    for name in settings.development_secrets():
        if name in _warned_secrets:
            continue
        _warned_secrets.add(name)
        log.warning(
            "%s is the DEVELOPMENT DEFAULT: audit seals are forgeable by anyone who knows it. "
            "Set %s to a secret of your own (e.g. `openssl rand -hex 32`); "
            "GOVERNANCE_REQUIRE_SECRETS=1 refuses to start without one.",
            name,
            name,
        )


class GovernanceRuntime:
    """The policy, settings and state of one app, in one process."""

    def __init__(self, settings: GovernanceSettings, policy: Policy) -> None:
        self.settings = settings
        self.watched_policy = WatchedPolicy(policy, settings.config_path, settings.policy_check_s)
        self._lock = forksafe.lock()
        self._pid: int | None = None
        self._state: StateStore | None = None
        self._admitter: Admitter | None = None
        self._audit: AuditLog | None = None
        self._ledger: Ledger | None = None
        self._durability: Durability | None = None
        self._confirmations: tuple[int, Confirmations] | None = None
        self.sealer = AuditSealer(settings.audit_key.get_secret_value().encode())
        self.leases = LeaseKeeper(
            self._renew, settings.heartbeat_interval_s, tick=self._tick, tick_s=SEAL_FLUSH_S
        )
        self.garbage = IgnoredDeliveries()
        self.unsettled = UnsettledAttempts()
        self._limits: dict[tuple[str, str | None], tuple[TenantPolicy, AdmissionLimits]] = {}
        self._raw_send: RawSend | None = None
        self.health = StoreHealth(settings.lease_ms / 1000, settings.heartbeat_interval_s)
        #: The worker pools as this process sees them (fair dispatch).
        self.pool_view = PoolView(lambda: self.state, lambda: self.policy)
        #: Whether task events are wanted here and now (a monitor asks: see ``monitor``).
        self.events = EventsSwitch(lambda: self.state)
        atexit.register(_flush_at_exit, weakref.ref(self))
        warn_development_secrets(settings)

    # -- policy-derived values ------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy in force (reloaded when its file changes, see ``policy_watch``)."""
        return self.watched_policy.current

    def limits_for(self, tenant: TenantPolicy, action: Action) -> AdmissionLimits:
        """The admission limits of ``tenant`` for ``action`` (cached per policy object: a
        reloaded policy brings new tenant objects, and so new limits)."""
        key = (tenant.name, action.provider if isinstance(action, LLMCall) else None)
        cached = self._limits.get(key)
        if cached is None or cached[0] is not tenant:
            provider = (
                self.policy.config.providers.get(action.provider)
                if isinstance(action, LLMCall)
                else None
            )
            cached = self._limits[key] = (
                tenant,
                AdmissionLimits.for_action(tenant, action, provider),
            )
        return cached[1]

    def chain(self, tenant: str | None) -> str:
        """The audit chain of an event about ``tenant`` (unknown tenants share one)."""
        return chain_for(tenant, self.policy.tenant_names)

    # -- state ---------------------------------------------------------------------------------

    def _ensure(self) -> StateStore:
        pid = forksafe.pid()
        if self._state is not None and self._pid == pid:
            return self._state
        with self._lock:
            if self._state is None or self._pid != pid:
                client = connect(self.settings.state_url, **self.settings.state_connection())
                timings = LedgerTimings(
                    grace_ms=round(self.settings.reconcile_after_s * 1000),
                    countdown_limit_ms=round(self.settings.countdown_limit_s * 1000),
                )
                state = StateStore(client, lease_ms=self.settings.lease_ms, timings=timings)
                self._admitter = Admitter(state, self.sealer)
                self._audit = AuditLog(state, self.sealer)
                self._ledger = Ledger(state, self.sealer)
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
    def ledger(self) -> Ledger:
        self._ensure()
        assert self._ledger is not None
        return self._ledger

    # -- durability (GOVERNANCE_STATE_DURABILITY, see ``durable``) -------------------------------

    @property
    def durable_on(self) -> bool:
        """Whether a task that lives only in the state Redis is confirmed durable first."""
        return self.settings.state_durability is not StateDurability.NONE

    def _durability_of_state(self) -> Durability:
        state = self.state
        found = self._durability
        if found is None or found.state is not state:
            settings = self.settings
            replicas = (
                settings.state_durable_replicas
                if settings.state_durability is StateDurability.REPLICAS
                else 0
            )
            rule = DurabilityRule(
                local=True, replicas=replicas, timeout_ms=settings.durability_round_ms
            )
            found = self._durability = Durability(state, rule)
        return found

    @property
    def confirmations(self) -> Confirmations:
        """This process's confirmations (one thread, made again after a fork)."""
        pid = forksafe.pid()
        found = self._confirmations
        if found is None or found[0] != pid:
            with self._lock:
                found = self._confirmations
                if found is None or found[0] != pid:
                    found = (pid, Confirmations(self._durability_of_state))
                    self._confirmations = found
        return found[1]

    def confirm_recorded(self, tenant: str, task_id: str) -> None:
        """A publisher's task now lives only in the state Redis: return once its record is
        confirmed durable; raise :class:`NotDurable` when it is not there (lost: not
        accepted) or not confirmed within ``GOVERNANCE_STATE_DURABLE_TIMEOUT_S``. Nothing to
        do without ``GOVERNANCE_STATE_DURABILITY``."""
        if not self.durable_on:
            return
        timeout_s = self.settings.state_durable_timeout_s
        verdict, why = self.confirmations.wait(tenant, task_id, timeout_s)
        if verdict is Verdict.DURABLE:
            return
        if verdict is Verdict.MISSING:
            raise NotDurable(task_id, "lost with a crash or a failover of the state Redis", False)
        raise NotDurable(task_id, f"not confirmed within {timeout_s:g} s: {why}", True)

    @property
    def removed_tenants(self) -> RemovedTenants:
        """Tenants removed from the policy while they have open tasks (see ``store.removed``)."""
        return RemovedTenants(self.state, self.sealer)

    def audit(self, *events: AuditEvent) -> None:
        """Append audit events that are not part of an admission or settlement (a denial, a
        note); a Redis failure is logged: the action they describe already happened."""
        try:
            self.audit_log.append(*(self._stamped(e) for e in events))
        except StoreUnavailable:
            log.exception("audit events could not be written: %s", [e.type for e in events])

    def end_without_running(self, event: AuditEvent) -> None:
        """Audit ``event``, by which a task ends on the worker without running (denied,
        shadowed), and end the task's ledger record in the same call (``AuditLog.end_task``).
        A Redis failure is logged: the record then stays, and the reconciler's next
        publication of the task ends the same way."""
        try:
            self.audit_log.end_task(self._stamped(event), self.state.ttl.task_s)
        except StoreUnavailable:
            log.exception("the end of task %s could not be written", event.task_id)

    def _stamped(self, event: AuditEvent) -> AuditEvent:
        """``event`` with the policy version, on its chain (see ``_replace_version``)."""
        if event.policy_version:
            return event
        return _replace_version(event, self.policy.version, self.chain(event.tenant))

    def _renew(self, ticket: AdmissionTicket) -> int:
        with self.health.call():
            return self.admitter.renew(ticket)

    def _tick(self) -> None:
        """The lease thread's periodic work: a liveness probe of the store, owed settlements
        and audit seals, and dead ``Ignore`` cycles."""
        if self._state is not None and self._pid == forksafe.pid():
            self.health.probe(lambda: self.state.run("liveness probe", self.state.client.ping))
            self.unsettled.retry()
            try:
                self.audit_log.flush_due(SEAL_FLUSH_S)
            except StoreUnavailable as exc:
                log.debug("owed audit seals wait for the state store: %s", exc)
        self.garbage.maybe_collect()

    def settle_later(self, ticket: AdmissionTicket, settle: Callable[[], None]) -> None:
        """Owe ``settle`` (see :mod:`governance.integration.unsettled`): tried on every tick of
        the lease thread, ``ticket``'s lease kept alive until it succeeds."""
        self.leases.keep(ticket)

        def settle_and_release() -> None:
            settle()
            self.leases.release(ticket)

        self.unsettled.add(ticket.holder, settle_and_release)

    def flush_owed_seals(self) -> None:
        """Write the audit seals this process still owes, when it exits (a pool process
        recycled, a warm shutdown, a publisher's end): otherwise its last entries wait,
        unsealed, for the leader's adoption, and ``govctl audit verify`` reports them meanwhile.
        Nothing to do in a process that never used the store."""
        if self._state is None or self._pid != forksafe.pid():
            return
        try:
            self.audit_log.flush_due(0.0)
        except StoreUnavailable as exc:
            log.warning("owed audit seals could not be written at exit: %s", exc)

    # -- publishing ----------------------------------------------------------------------------

    def set_raw_send(self, send: RawSend) -> None:
        self._raw_send = send

    def send_raw(self, name: str, args: Any, kwargs: Any, **options: Any) -> Any:
        """The app's original ``send_task``: straight to the broker, no governance checks."""
        if self._raw_send is None:
            raise RuntimeError("the governance runtime is not installed on a Celery app")
        return self._raw_send(name, args, kwargs, **options)

    def publish(
        self,
        envelope: Envelope,
        *,
        headers: dict[str, Any] | None = None,
        countdown_s: float | None = None,
    ) -> None:
        """Publish a message again (a hand-off, a retry, a re-publication), bypassing the
        publisher's checks: it is the same task, already recorded in the ledger."""
        if self._raw_send is None:
            raise RuntimeError("the governance runtime is not installed on a Celery app")
        publish(self._raw_send, envelope, headers=headers, countdown_s=countdown_s)

    def close_run(self, tenant: str, run: str, by: str) -> tuple[bool, list[Publication]]:
        """Close ``run`` of ``tenant`` (audited as closed by ``by``): it stops counting against
        the tenant's ``run_concurrency``, and the waiting steps of other runs that now fit are
        handed on and published, oldest first. Returns whether it was in flight, and what was
        published."""
        with self.health.call():
            result = self.ledger.sweep(
                tenant, close_run=(run, by), policy_version=self.policy.version
            )
            self.audit_log.flush(tenant)
        return result.closed, self.publish_each(result.publish)

    def sweep_tenant(self, tenant: str, *, pool_gated: bool = False) -> list[Publication]:
        """One reconciler round for ``tenant`` now (an operator let it go on: a resume, a raised
        limit), its waiting tasks that fit handed on (unless a saturated pool gives capacity:
        ``pool_gated``) and published; what was published."""
        with self.health.call():
            result = self.ledger.sweep(
                tenant,
                reclaim=self.health.may_reclaim,
                policy_version=self.policy.version,
                pool_gated=pool_gated,
            )
        return self.publish_each(result.publish)

    def publish_each(self, publications: Iterable[Publication]) -> list[Publication]:
        """Publish what a store call handed on (hand-offs with their token, tasks published
        again); returns those that went out. A failure is logged and left to the reconciler:
        the ledger has every one of them."""
        sent = []
        for publication in publications:
            headers = {HANDOFF: publication.handoff} if publication.handoff else None
            try:
                self.publish(Envelope.from_dict(publication.envelope), headers=headers)
            except Exception:
                log.warning(
                    "could not publish task %s; the reconciler will",
                    publication.task_id,
                    exc_info=True,
                )
                continue
            sent.append(publication)
        return sent


def _flush_at_exit(runtime: weakref.ref[GovernanceRuntime]) -> None:
    """At interpreter exit: the owed seals of a runtime still alive (a weak reference, so a
    runtime is not kept alive for this alone)."""
    alive = runtime()
    if alive is not None:
        alive.flush_owed_seals()


def _replace_version(event: AuditEvent, version: str, chain: str) -> AuditEvent:
    tenant = event.tenant if chain == event.tenant else ""
    detail = dict(event.detail)
    if event.tenant and not tenant:
        detail["tenant"] = event.tenant  # an unknown tenant's name: kept, but not as a chain
    return replace(event, policy_version=version, tenant=tenant, detail=detail)


def attach(app: Any, runtime: GovernanceRuntime) -> None:
    """Make ``runtime`` the one ``app``'s governed tasks find (see ``setup.install``, which
    also wires publishing and the worker's signals)."""
    _RUNTIMES[app] = runtime


#: How an app whose first governed task is bound to it gets governed from the environment:
#: ``setup.govern_from_environment``, registered by :mod:`governance.integration.setup` (which
#: the package imports first), so the task class, in the worker wing, need not import the setup
#: above it.
_GOVERN_ON_BIND: list[Callable[[Any], None]] = []


def on_first_bind(govern: Callable[[Any], None]) -> None:
    """Register how an app is governed when a governed task is bound to it (once)."""
    if not _GOVERN_ON_BIND:
        _GOVERN_ON_BIND.append(govern)


def govern_bound_app(app: Any) -> None:
    """A governed task was bound to ``app``: govern it from the environment unless it already
    has a runtime."""
    if installed_on(app) is None and _GOVERN_ON_BIND:
        _GOVERN_ON_BIND[0](app)


def installed_on(app: Any) -> GovernanceRuntime | None:
    """The runtime installed on ``app``, if any."""
    return _RUNTIMES.get(app)


def runtime_for(app: Any) -> GovernanceRuntime:
    """The runtime installed on ``app``; a clear error when the app was never set up."""
    try:
        return _RUNTIMES[app]
    except KeyError:
        raise RuntimeError(
            f"Celery app {getattr(app, 'main', app)!r} has no governance runtime: call "
            "governance.integration.govern(app) when the app is created"
        ) from None
