"""The worker's maintenance thread: what must happen even when no task arrives.

Every worker runs one; a leader lock in Redis lets one of them work at a time (the others stand
by and take over within a few seconds when it dies). Each round, the leader:

- sweeps the ledger of every tenant with due entries (the reconciler): parked tasks that are due,
  messages lost between broker and worker, tasks of dead workers, hand-offs that never arrived,
  waits past their limit; and hands free capacity to waiting tasks (also every few seconds for
  tenants that have waiting tasks, for capacity freed without a settlement);
- every ``held_sweep_s``, rejects held tasks whose hold expired;
- (in a thread of its own, so a slow webhook delays nothing else) sends the notifications of
  held tasks to the tenants' reviewers;
- every ``audit_checkpoint_s``, signs where each audit chain ends, seals (adopts) entries whose
  writer was killed before sealing them, and trims entries older than the policy's
  ``audit.retention`` (after a signed record of where the chain now starts).

Every worker, leader or not, also checks the policy file each round (a changed one is enforced at
once, an invalid one changes nothing and is audited) and reports every ``POLICY_REPORT_S`` the
version it enforces, for ``govctl policy status``.

Every step is atomic in Redis, so two leaders for a moment (a lock that expired under a slow
leader) never do anything twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from governance.integration.approvals.notify import NotifierThread
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.store import audit_verify
from governance.store.admission import Publication
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.errors import StoreUnavailable
from governance.store.keys import DEPLOYMENT_CHAIN, DeploymentKeys
from governance.store.leader import LeaderLock

log = logging.getLogger("governance.maintenance")

#: Tenants with waiting tasks are swept this often even when nothing in their ledger is due.
WAITING_SWEEP_S = 5.0
#: Audit entries left unsealed are adopted only within this many checkpoint rounds after their
#: seal grace (an orphan is adopted in the first of them): an older one lost its seal to
#: someone's edit, and verify names it rather than the leader sealing it.
ADOPTION_ROUNDS = 10

#: How often each worker reports the policy version it enforces.
POLICY_REPORT_S = 5.0


class MaintenanceThread:
    def __init__(self, app: Any, runtime: GovernanceRuntime, node: str | None = None) -> None:
        self._app = app
        self._runtime = runtime
        #: The worker's node name (as Celery and Flower show it).
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self._next_report = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="governance-maintenance", daemon=True
        )
        self._me = uuid.uuid4().hex
        self._next_held = 0.0
        self._next_waiting = 0.0
        self._next_audit = 0.0
        self._adopt_from: dict[str, str] = {}
        #: The highest seq this leader signed per chain (in memory, out of reach of whoever can
        #: write Redis): a chain that ends before it later was rolled back, and is logged.
        self._signed: dict[str, int] = {}
        self.republished = 0
        #: Whether this process held the leader lock at its last round.
        self.leading = False
        self._notifier = NotifierThread(runtime, lambda: self.leading)

    def start(self) -> None:
        self._thread.start()
        self._notifier.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._notifier.stop()

    def _lead(self) -> bool:
        """Take or keep the leader lock (it lapses after a few rounds without renewal)."""
        ttl_ms = max(3000, int(self._runtime.settings.sweep_poll_s * 6000))
        return LeaderLock(self._runtime.state, self._me, ttl_ms).take_or_keep()

    def run_once(self) -> None:
        """One round (tests call it directly)."""
        runtime = self._runtime
        with runtime.health.call():
            self._watch_policy()
            self.leading = self._lead()
            if not self.leading:
                return
            now = time.monotonic()
            tenants = runtime.policy.tenant_names
            waiting_too = now >= self._next_waiting
            if waiting_too:
                self._next_waiting = now + WAITING_SWEEP_S
            for tenant in runtime.ledger.tenants_due(tenants, waiting_too=waiting_too):
                self._sweep(tenant)
            if now >= self._next_held:
                self._next_held = now + runtime.settings.held_sweep_s
                Reviewers(self._app, runtime).expire_due()
            if now >= self._next_audit:
                self._next_audit = now + runtime.settings.audit_checkpoint_s
                self._audit_round((*tenants, DEPLOYMENT_CHAIN))

    def _watch_policy(self) -> None:
        """Pick up a changed policy file now, audit what happened, report what is enforced."""
        runtime = self._runtime
        watched = runtime.watched_policy
        change = watched.check()
        if change is not None:
            detail = {"node": self.node, "file": str(watched.path), "from": change.old_version}
            if change.new_version is not None:
                event = AuditEvent(
                    type=AuditEventType.POLICY_RELOADED,
                    decision="allow",
                    reason=f"policy version {change.new_version} replaces {change.old_version}",
                    policy_version=change.new_version,
                    detail=detail,
                )
            else:
                event = AuditEvent(
                    type=AuditEventType.POLICY_INVALID,
                    decision="deny",
                    reason=(change.error or "")[:2000],
                    policy_version=change.old_version,
                    detail=detail,
                )
            runtime.audit(event)
        now = time.monotonic()
        if change is None and now < self._next_report:
            return
        self._next_report = now + POLICY_REPORT_S
        report = {
            "version": runtime.policy.version,
            "loaded_at": round(watched.loaded_at, 3),
            "error": watched.error,
            "file": str(watched.path) if watched.path else None,
            "seen_at": round(time.time(), 3),
        }
        runtime.state.run(
            "policy report",
            lambda: runtime.state.client.hset(
                DeploymentKeys.policy_reports, self.node, json.dumps(report)
            ),
        )

    def _sweep(self, tenant: str) -> None:
        runtime = self._runtime
        for _ in range(50):  # a bounded round; what is left is due again next round
            result = runtime.ledger.sweep(
                tenant, reclaim=runtime.health.may_reclaim, policy_version=runtime.policy.version
            )
            self._publish(result.publish)
            if not result.more:
                return

    def _publish(self, publications: tuple[Publication, ...]) -> None:
        for publication in self._runtime.publish_each(publications):
            if publication.again:
                self.republished += 1
                log.info("reconciler published task %s again", publication.task_id)

    def _audit_round(self, chains: tuple[str, ...]) -> None:
        runtime = self._runtime
        key = runtime.settings.audit_key.get_secret_value().encode()
        grace_ms = round(runtime.settings.seal_grace_s * 1000)
        log_ = runtime.audit_log
        for chain in chains:
            adopted, self._adopt_from[chain] = audit_verify.adopt(
                log_,
                key,
                chain,
                grace_ms=grace_ms,
                start=self._adopt_from.get(chain, "-"),
                window_ms=round(ADOPTION_ROUNDS * runtime.settings.audit_checkpoint_s * 1000),
            )
            if adopted:
                log.warning(
                    "sealed %d audit entries of %s left unsealed by a stopped writer",
                    adopted,
                    chain,
                )
            try:
                signed = audit_verify.checkpoint(
                    log_, key, chain, at_least=self._signed.get(chain, 0)
                )
            except audit_verify.ChainRolledBack as exc:
                # Redis lost or had removed what this leader signed: say so where Redis cannot
                # reach (its log), then sign the chain as it is now, so verify judges what
                # comes next. Only an anchor outside Redis could prove more.
                log.error("%s", exc)
                signed = audit_verify.checkpoint(log_, key, chain)
            self._signed[chain] = signed
            retention = runtime.policy.config.audit.retention
            if retention is not None:
                trimmed = audit_verify.trim(
                    log_, key, chain, round(retention.total_seconds() * 1000)
                )
                if trimmed:
                    log.info(
                        "trimmed %d audit entries of %s (retention %s)", trimmed, chain, retention
                    )

    def _loop(self) -> None:
        while not self._stop.wait(self._runtime.settings.sweep_poll_s):
            try:
                self.run_once()
            except StoreUnavailable as exc:
                log.warning("maintenance skipped a round: %s", exc)
            except Exception:
                log.exception("maintenance failed this round")
