"""The worker's maintenance thread: what must happen even when no task arrives.

Every worker runs one; a leader lock in Redis lets one of them work at a time (the others stand
by and take over within a few seconds when it dies). Each round, the leader:

- sweeps the ledger of every tenant with due entries (the reconciler): parked tasks that are due,
  messages lost between broker and worker, tasks of dead workers, hand-offs that never arrived,
  waits past their limit; and hands free capacity to waiting tasks (also every few seconds for
  tenants that have waiting tasks, for capacity freed without a settlement);
- every ``held_sweep_s``, rejects held tasks whose hold expired;
- while task events are on (a monitor asks for them), announces every held task again, a page
  per round, every ``held_announce_s`` and at once when events go on, so a Flower started at
  any time lists them (:mod:`~governance.integration.approvals.announce`);
- (in a thread of its own, so a slow webhook delays nothing else) sends the notifications of
  held tasks to the tenants' reviewers;
- every ``audit_adopt_s``, seals (adopts) audit entries whose writer was killed before sealing
  them, and looks for a chain that ends before an entry it saw (cut back, or wiped): an error in
  its log, and for a cut an ``audit_rolled_back`` entry in the chain, which ``govctl audit
  verify`` reports;
- every ``audit_checkpoint_s``, signs where each audit chain ends, appends that checkpoint,
  signed with the anchor key, to the anchor files outside Redis (with
  ``audit_anchor_key_file``), and trims entries older than the policy's ``audit.retention``
  (after a signed record of where the chain now starts). A leader that takes over reads the
  anchors first: what it looks for starts from there, not from nothing.

Every worker, leader or not, also checks the policy file each round (a changed one is enforced at
once, an invalid one changes nothing and is audited) and reports every ``POLICY_REPORT_S`` the
version it enforces, for ``govctl policy status``; and while its task events are on, it keeps
the state Redis's flag that says so (``store.events_flag``: publishers and ``govctl`` send
their events only while it is there), written again every ``EVENTS_FLAG_S`` and at once when
its events go on, expiring when its events lease ends.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from governance import forksafe
from governance.integration.approvals.announce import HeldAnnouncer
from governance.integration.approvals.notify import NotifierThread
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.integration.worker.pool_keeper import PoolKeeper
from governance.integration.worker.removed_tenants import (
    RemovedTenantSweep,
    register_policy_tenants,
)
from governance.settings import GovernanceSettings
from governance.store import audit_anchor, audit_verify
from governance.store.admission import Publication
from governance.store.audit import AuditEvent, AuditEventType
from governance.store.audit_anchor import AnchorKeyError, AnchorRecord, AnchorSigner
from governance.store.audit_seal import key_id
from governance.store.errors import StoreUnavailable
from governance.store.events_flag import write_events_flag
from governance.store.keys import DEPLOYMENT_CHAIN, DeploymentKeys
from governance.store.leader import LeaderLock

log = logging.getLogger("governance.maintenance")

#: Tenants with waiting tasks are swept this often even when nothing in their ledger is due.
WAITING_SWEEP_S = 5.0
#: Audit entries left unsealed are adopted only within this many rounds (checkpoint or adoption
#: rounds, the longer) after their seal grace (an orphan is adopted in the first of them): an
#: older one lost its seal to someone's edit, and verify names it rather than the leader sealing
#: it.
ADOPTION_ROUNDS = 10


def leader_ttl_ms(settings: GovernanceSettings) -> int:
    """The leader lock's lifetime: it lapses this long after a leader's last round."""
    return max(3000, int(settings.sweep_poll_s * 6000))


def adoption_allowance_ms(settings: GovernanceSettings) -> int:
    """How long after the seal grace an entry a killed writer left unsealed may wait for its
    adoption: the next adoption round, or, when the leader died too, the lock's lapse and the
    next leader's first round; and one round's work. ``govctl audit verify`` names an unsealed
    entry only once it is older than the grace plus this."""
    longest = max(settings.audit_adopt_s * 1000, leader_ttl_ms(settings))
    return round(longest + settings.sweep_poll_s * 1000)


#: How often each worker reports the policy version it enforces.
POLICY_REPORT_S = 5.0
#: How often each worker writes the tenants of its policy to the registry even if its policy did
#: not change (see ``store.removed``).
REGISTER_TENANTS_S = 300.0
#: How often a worker whose task events are on writes the events flag again.
EVENTS_FLAG_S = 1.0


class MaintenanceThread:
    def __init__(
        self,
        app: Any,
        runtime: GovernanceRuntime,
        node: str | None = None,
        serves: Mapping[str, int] | None = None,
    ) -> None:
        self._app = app
        self._runtime = runtime
        #: The worker's node name (as Celery and Flower show it).
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        #: The pools of the queues it consumes (its pool size there): fair dispatch.
        self.pools = PoolKeeper(runtime, self.node, serves or {})
        self._next_registration = 0.0
        self._next_report = 0.0
        self._stop = forksafe.event()
        self._thread = threading.Thread(
            target=self._loop, name="governance-maintenance", daemon=True
        )
        self._me = uuid.uuid4().hex
        self._next_held = 0.0
        self._next_waiting = 0.0
        self._next_audit = 0.0
        self._next_adopt = 0.0
        #: Per chain, what this leader read of it for adoption (see ``audit_verify.adopt``).
        self._adoption: dict[str, audit_verify.AdoptionCursor] = {}
        #: The highest seq this leader signed per chain (in memory, out of reach of whoever can
        #: write Redis): a chain that ends before it later was rolled back, and is logged.
        self._signed: dict[str, int] = {}
        #: Where each chain ended when this leader last looked (its memory, and the anchors'
        #: when it takes over): a chain that ends before it was cut back or wiped.
        self._seen: dict[str, audit_verify.Head] = {}
        #: The seq of each chain's last anchored checkpoint.
        self._anchored: dict[str, int] = {}
        #: Whether the anchors are to be read (again) before the next audit round: at start,
        #: and whenever this process takes the lead again.
        self._read_anchors = True
        self._signer: AnchorSigner | None = None
        self.republished = 0
        #: Whether this process held the leader lock at its last round.
        self.leading = False
        self._notifier = NotifierThread(runtime, lambda: self.leading)
        self._removed = RemovedTenantSweep(app, runtime)
        #: The policy version whose tenants this worker registered (see ``store.removed``).
        self._registered_version: str | None = None
        self._next_register = 0.0
        self._next_removed = 0.0
        #: Known tenants the policy no longer names, as the last round saw them: their chains
        #: are checkpointed and adopted like the policy's tenants'.
        self._removed_seen: tuple[str, ...] = ()
        #: Whether this worker's task events were on at its last round, and when it writes
        #: the events flag next.
        self.events_on = False
        self._next_flag = 0.0
        self._announcer = HeldAnnouncer(app, runtime)

    def start(self) -> None:
        self._thread.start()
        self._notifier.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._notifier.stop()
        self.pools.leave()

    def _lead(self) -> bool:
        """Take or keep the leader lock (it lapses after a few rounds without renewal)."""
        ttl_ms = leader_ttl_ms(self._runtime.settings)
        return LeaderLock(self._runtime.state, self._me, ttl_ms).take_or_keep()

    def run_once(self) -> None:
        """One round (tests call it directly)."""
        runtime = self._runtime
        with runtime.health.call():
            self._watch_policy()
            events_on = self._keep_events_flag()
            self.leading = self._lead()
            self.pools.round(self.leading, self._waiting_tenants())
            if not self.leading:
                self._read_anchors = True
                return
            now = time.monotonic()
            tenants = runtime.policy.tenant_names
            if now >= self._next_removed:
                self._next_removed = now + WAITING_SWEEP_S
                self._removed_seen = tuple(t.tenant for t in self._removed.round())
            waiting_too = now >= self._next_waiting
            if waiting_too:
                self._next_waiting = now + WAITING_SWEEP_S
            for tenant in runtime.ledger.tenants_due(tenants, waiting_too=waiting_too):
                self._sweep(tenant)
            if now >= self._next_held:
                self._next_held = now + runtime.settings.held_sweep_s
                Reviewers(self._app, runtime).expire_due()
            self._announcer.round(events_on, (*tenants, *self._removed_seen))
            if now >= self._next_audit or now >= self._next_adopt:
                checkpoint = now >= self._next_audit
                if checkpoint:
                    self._next_audit = now + runtime.settings.audit_checkpoint_s
                self._next_adopt = now + runtime.settings.audit_adopt_s
                chains = (*tenants, *self._removed_seen, DEPLOYMENT_CHAIN)
                self._audit_round(chains, checkpoint=checkpoint)

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
        if runtime.policy.version != self._registered_version or now >= self._next_register:
            # Again now and then: a registry lost with the state (a failover) is written back.
            register_policy_tenants(runtime)
            self._registered_version = runtime.policy.version
            self._next_register = now + REGISTER_TENANTS_S
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

    def _keep_events_flag(self) -> bool:
        """Whether this worker's task events are on; while they are, the flag that tells
        publishers so is written (at once when they go on), expiring with the lease."""
        lease = self._runtime.events.worker_lease()
        on = lease is not None and lease.on()
        now = time.monotonic()
        if lease is not None and on and (not self.events_on or now >= self._next_flag):
            self._next_flag = now + EVENTS_FLAG_S
            write_events_flag(self._runtime.state, self.node, round(lease.remaining_s() * 1000))
        self.events_on = on
        return on

    def _waiting_tenants(self) -> list[str]:
        """When leading, every ``WAITING_SWEEP_S``: the tenants with waiting tasks (fair
        dispatch registers them with the saturated pools)."""
        now = time.monotonic()
        if not self.leading or now < self._next_registration:
            return []
        self._next_registration = now + WAITING_SWEEP_S
        return self._runtime.ledger.waiting_tenants(self._runtime.policy.tenant_names)

    def _sweep(self, tenant: str) -> None:
        runtime = self._runtime
        # In a saturated pool the capacity a sweep frees is the pool's to give (fair dispatch).
        gated = any(runtime.pool_view.saturated(q) for q in self.pools.serves)
        for _ in range(50):  # a bounded round; what is left is due again next round
            result = runtime.ledger.sweep(
                tenant,
                reclaim=runtime.health.may_reclaim,
                policy_version=runtime.policy.version,
                pool_gated=gated,
            )
            self._publish(result.publish)
            if not result.more:
                return

    def _publish(self, publications: tuple[Publication, ...]) -> None:
        for publication in self._runtime.publish_each(publications):
            if publication.again:
                self.republished += 1
                log.info("reconciler published task %s again", publication.task_id)

    def _audit_round(self, chains: tuple[str, ...], *, checkpoint: bool = True) -> None:
        """Each chain: look for a rollback, adopt orphans; with ``checkpoint``, sign where it
        ends, anchor that outside Redis, and trim it to the retention."""
        runtime = self._runtime
        settings = runtime.settings
        key = settings.audit_key.get_secret_value().encode()
        grace_ms = round(settings.seal_grace_s * 1000)
        window_ms = round(
            ADOPTION_ROUNDS * max(settings.audit_checkpoint_s, settings.audit_adopt_s) * 1000
        )
        log_ = runtime.audit_log
        signer = self._anchor_signer() if checkpoint or self._read_anchors else self._signer
        if self._read_anchors:
            self._read_anchors = False
            self._remember_anchors(signer)
        anchors: list[AnchorRecord] = []
        for chain in chains:
            self._watch(chain)
            adopted = audit_verify.adopt(
                log_,
                key,
                chain,
                grace_ms=grace_ms,
                cursor=self._adoption.setdefault(chain, audit_verify.AdoptionCursor()),
                window_ms=window_ms,
            )
            if adopted:
                log.warning(
                    "sealed %d audit entries of %s left unsealed by a stopped writer",
                    adopted,
                    chain,
                )
            if not checkpoint:
                continue
            try:
                signed = audit_verify.checkpoint(
                    log_, key, chain, at_least=self._signed.get(chain, 0)
                )
            except audit_verify.ChainRolledBack as exc:
                # Redis lost or had removed what this leader signed: say so where Redis cannot
                # reach (its log), then sign the chain as it is now, so verify judges what
                # comes next; the anchors keep what was signed before.
                log.error("%s", exc)
                signed = audit_verify.checkpoint(log_, key, chain)
            self._signed[chain] = signed
            if signer is not None and signed and self._anchored.get(chain) != signed:
                record = audit_verify.anchor_of(log_, key, chain)
                if record is not None:
                    anchors.append(record)
            retention = runtime.policy.config.audit.retention
            if retention is not None:
                trimmed = audit_verify.trim(
                    log_, key, chain, round(retention.total_seconds() * 1000)
                )
                if trimmed:
                    log.info(
                        "trimmed %d audit entries of %s (retention %s)", trimmed, chain, retention
                    )
        if signer is not None and anchors:
            self._anchor(signer, anchors)

    def _watch(self, chain: str) -> None:
        """Look for ``chain`` ending before where it ended when this leader last looked: an
        error in the log (out of reach of whoever writes Redis); for a cut (older entries are
        still there), an ``audit_rolled_back`` entry too, which verify reports. A chain wiped
        whole is logged only: what remains of it is a new chain."""
        seen, rolled_back = audit_verify.watch(
            self._runtime.audit_log, chain, self._seen.get(chain)
        )
        if seen is None:
            self._seen.pop(chain, None)
        else:
            self._seen[chain] = seen
        if rolled_back is None:
            return
        log.error("%s", rolled_back.message)
        self._signed[chain] = 0
        self._anchored.pop(chain, None)
        if rolled_back.cut:
            self._runtime.audit(
                AuditEvent(
                    type=AuditEventType.AUDIT_ROLLED_BACK,
                    tenant="" if chain == DEPLOYMENT_CHAIN else chain,
                    decision="deny",
                    reason=(
                        f"the maintenance leader found the chain cut back: it had seen seq "
                        f"{rolled_back.seen.seq} (entry {rolled_back.seen.id}), and it ends at "
                        f"seq {rolled_back.now_seq}: entries were removed and the counter reset "
                        "(or the state Redis lost writes)"
                    ),
                    detail={
                        "node": self.node,
                        "seen_seq": rolled_back.seen.seq,
                        "seen_entry": rolled_back.seen.id,
                        "ends_at": rolled_back.now_seq,
                    },
                )
            )

    def _anchor_signer(self) -> AnchorSigner | None:
        """The anchor key (read once), or None without one: no anchors. A key that cannot be
        read is logged at every checkpoint round until it can."""
        path = self._runtime.settings.audit_anchor_key_file
        if path is None or self._signer is not None:
            return self._signer
        try:
            self._signer = AnchorSigner.from_file(path)
        except AnchorKeyError as exc:
            log.error("audit checkpoints are not anchored: %s", exc)
        return self._signer

    def _anchor_paths(self) -> list[Path]:
        return audit_anchor.parse_paths(self._runtime.settings.audit_anchors)

    def _remember_anchors(self, signer: AnchorSigner | None) -> None:
        """Start from the anchors (this leader may be new): where each chain ended when it was
        last anchored, so a chain rolled back or wiped while no leader remembered is found."""
        if signer is None:
            return
        paths = [p for p in self._anchor_paths() if p.exists()]
        try:
            found = audit_anchor.read_anchors(paths, signer.verifier)
        except OSError as exc:
            log.error("cannot read the audit anchors: %s", exc)
            return
        mine = key_id(self._runtime.settings.audit_key.get_secret_value().encode())
        for chain, record in found.newest().items():
            if record.key != mine:
                continue
            self._anchored[chain] = record.seq
            seen = self._seen.get(chain)
            if seen is None or record.seq > seen.seq:
                self._seen[chain] = audit_verify.Head(record.seq, record.id)

    def _anchor(self, signer: AnchorSigner, records: list[AnchorRecord]) -> None:
        """Append ``records`` to every anchor file; remembered once all have them (a file that
        failed gets them again next round)."""
        ok = True
        for path in self._anchor_paths():
            try:
                audit_anchor.append_anchors(path, signer, records)
            except OSError as exc:
                ok = False
                log.error("cannot append audit anchors to %s: %s", path, exc)
        if ok:
            for record in records:
                self._anchored[record.chain] = record.seq

    def _loop(self) -> None:
        while not self._stop.wait(self._runtime.settings.sweep_poll_s):
            try:
                self.run_once()
            except StoreUnavailable as exc:
                log.warning("maintenance skipped a round: %s", exc)
            except Exception:
                log.exception("maintenance failed this round")
