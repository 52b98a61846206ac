"""Settling one admitted attempt: one Lua call, also when the body raised, never lost.

The outcome is decided first (:mod:`governance.integration.worker.outcome`), so one
``settle.lua`` call releases the lease, counts the usage, writes the attempt's audit entry,
records a retry (queued, or parked when its delay is long) and hands freed capacity to waiting
tasks, whose messages are then published, with the retry's.

Where the delivery runs in Celery's tracer, the call is written before the task returns and read
after Celery has stored the result (``task_postrun``, see
:mod:`governance.integration.worker.overlap`): the two round trips overlap. When the state store
does not answer, the settlement is tried again with backoff, for at most half the broker's limit
on an unacknowledged delivery; after that the delivery is acknowledged and the process owes the
settlement (:mod:`governance.integration.unsettled`), its lease kept alive until it succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from governance.integration.messages import Envelope
from governance.integration.runtime import GovernanceRuntime
from governance.integration.worker.dispatch import completion, dispatch
from governance.integration.worker.outcome import AttemptOutcome
from governance.integration.worker.overlap import defer_settlement, settling_after_result
from governance.policy.actions import Action
from governance.policy.usage import Usage
from governance.store.admission import AdmissionTicket, NextAttempt, Settlement
from governance.store.errors import StoreUnavailable
from governance.store.pending import Pending

log = logging.getLogger("governance.lifecycle")


@dataclass(frozen=True)
class AttemptSettlement:
    """The settlement of one attempt of one delivery.

    ``envelope``: the delivery's message (its next attempt is published from it; built only
    when a retry needs it, it costs the hot path otherwise); ``started``:
    when the delivery reached the task (monotonic; the broker's clock on an unacknowledged
    delivery started then at the latest).
    """

    runtime: GovernanceRuntime
    task: Any
    ticket: AdmissionTicket
    envelope: Callable[[], Envelope]
    attempt: int
    started: float
    #: The queue the task came from, its action and its tenant's weight (fair dispatch).
    queue: str = ""
    action: Action | None = None
    weight: float = 1.0

    def settle(self, actual: Usage, outcome: AttemptOutcome, run_ms: float = 0.0) -> None:
        """Record ``outcome`` with ``actual`` usage, then publish what follows; in a saturated
        pool, the capacity it frees goes through fair dispatch (see ``worker.dispatch``)."""
        gated = self.runtime.pool_view.saturated(self.queue) if self.queue else False
        next_attempt = None
        if outcome.retry_delay_ms is not None:
            due_ms = int(time.time() * 1000) + outcome.retry_delay_ms
            parked = outcome.retry_delay_ms / 1000 > self.runtime.settings.countdown_limit_s
            next_envelope = self.envelope().with_retries(self.attempt + 1)
            next_attempt = NextAttempt(next_envelope.to_json(), due_ms, parked)

        def write() -> Pending[Settlement]:
            with self.runtime.health.call():
                return self.runtime.admitter.begin_settle(
                    self.ticket,
                    actual,
                    entry=outcome.entry,
                    next_attempt=next_attempt,
                    reclaim=self.runtime.health.may_reclaim,
                    policy_version=self.runtime.policy.version,
                    run_ms=run_ms,
                    pool_gated=gated,
                )

        def finish(written: Pending[Settlement] | None = None) -> None:
            read = written or write()
            with self.runtime.health.call():
                settlement = read.result()
            self.runtime.publish_each(settlement.publish)
            if next_attempt is not None and not next_attempt.parked:
                self._publish_retry(outcome.retry_delay_ms or 0)
            if (gated or settlement.pool_grant) and self.action is not None:
                tenant = self.ticket.tenant
                dispatch(
                    self.runtime,
                    self.queue,
                    completed=completion(
                        self.runtime, tenant, self.action, actual, run_ms, settlement.pool_grant
                    ),
                    register=(tenant, self.weight) if settlement.waiting else None,
                    give=gated,
                )

        if settling_after_result(self.task):
            # Written now, read once Celery has stored the result (its round trip overlaps
            # this one), in ``task_postrun``: before the delivery is acknowledged.
            try:
                written = write()
            except StoreUnavailable:
                pass
            else:
                defer_settlement(self.task, lambda: self._patiently(finish, written))
                return
        self._patiently(finish, None)

    def _patiently(
        self,
        finish: Callable[[Pending[Settlement] | None], None],
        written: Pending[Settlement] | None,
    ) -> None:
        """``finish``, tried again while the store does not answer, never longer than half the
        broker's limit on an unacknowledged delivery; then owed (see the module doc)."""
        settings = self.runtime.settings
        deadline = min(
            time.monotonic() + settings.settle_patience_s,
            self.started + settings.unacked_limit_s / 2,
        )
        pause = 0.2
        while True:
            try:
                finish(written)
                return
            except StoreUnavailable as exc:
                written = None
                if time.monotonic() + pause > deadline:
                    log.error(
                        "task %s ran but could not be settled: %s; its delivery is "
                        "acknowledged and this worker process settles it when the state "
                        "store is back",
                        self.ticket.task_id,
                        exc,
                    )
                    self.runtime.settle_later(self.ticket, lambda: finish(None))
                    return
                log.warning("settlement of %s failed, trying again: %s", self.ticket.task_id, exc)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _publish_retry(self, delay_ms: int) -> None:
        envelope = self.envelope().with_retries(self.attempt + 1)
        try:
            self.runtime.publish(envelope, countdown_s=delay_ms / 1000)
        except Exception:
            log.warning(
                "could not publish the retry of %s; the reconciler will",
                self.ticket.task_id,
                exc_info=True,
            )
