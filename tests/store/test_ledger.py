"""The ledger and the reconciler: lost messages, dead workers and expired waits are found."""

from __future__ import annotations

import json
import time

from governance.store import StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits
from governance.store.state import LedgerTimings
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool


def fast_state(client: object, **timings: int) -> StateStore:
    return StateStore(client, lease_ms=300, timings=LedgerTimings(**{"grace_ms": 200, **timings}))


def test_a_published_message_never_received_is_published_again(redis_client: object) -> None:
    state = fast_state(redis_client)
    ledger = Ledger(state)
    ledger.record_published("acme", "lost", envelope("lost"))
    assert ledger.sweep("acme").publish == ()  # still within its grace
    time.sleep(0.25)
    (again,) = ledger.sweep("acme").publish
    assert again.task_id == "lost"
    assert again.again
    assert again.envelope == json.loads(envelope("lost"))
    # The grace doubles: not published again at once.
    assert ledger.sweep("acme").publish == ()
    # Received at last: admitted once; the reconciler's copy (or the original) is then dropped.
    admitter = Admitter(state)
    first = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="lost",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
        holder="a",
    )
    assert first.admitted
    copy = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="lost",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
        holder="b",
    )
    assert copy.status is AdmissionStatus.DUPLICATE
    admitter.settle(first.ticket, TOOL_STEP)
    assert ledger.where("acme", "lost")["where"] == "done"
    time.sleep(0.25)
    assert ledger.sweep("acme").publish == ()


def test_the_task_of_a_dead_worker_is_published_again_once_its_lease_expires(
    redis_client: object,
) -> None:
    state = fast_state(redis_client)
    admitter, ledger = Admitter(state), Ledger(state)
    admitted = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="orphan",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(concurrency=1),
        envelope=envelope("orphan"),
    )
    assert admitted.admitted
    assert ledger.sweep("acme").publish == ()  # its lease is alive
    assert ledger.sweep("acme", reclaim=False).publish == ()
    time.sleep(0.35)
    # Right after an outage of the store nobody reclaims: its holder may only have been cut off.
    assert ledger.sweep("acme", reclaim=False).publish == ()
    time.sleep(0.25)  # (looked at again after the grace)
    (again,) = ledger.sweep("acme").publish
    assert again.task_id == "orphan"
    redelivered = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="orphan",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(concurrency=1),
        holder="new",
    )
    assert redelivered.admitted
    # The dead holder settles late: counted once, the new holder's lease untouched.
    late = admitter.settle(admitted.ticket, TOOL_STEP)
    assert late.late


def test_a_task_that_waits_past_its_limit_ends_on_its_next_delivery(redis_client: object) -> None:
    state = fast_state(redis_client)
    admitter, ledger = Admitter(state), Ledger(state)
    limits = AdmissionLimits(concurrency=1, max_wait_ms=300)
    running = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="runner",
        attempt=0,
        estimate=TOOL_STEP,
        limits=limits,
        envelope=envelope("runner"),
    )
    assert running.admitted
    waiting = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="patient",
        attempt=0,
        estimate=TOOL_STEP,
        limits=limits,
        envelope=envelope("patient"),
    )
    assert waiting.status is AdmissionStatus.WAITING
    for _ in range(50):
        admitter.renew(running.ticket)
        published = ledger.sweep("acme").publish
        if published:
            break
        time.sleep(0.02)
    (expired,) = published
    assert expired.task_id == "patient"
    assert expired.handoff is None
    ended = admitter.admit(
        ctx=ctx(), action=tool(), task_id="patient", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert ended.status is AdmissionStatus.REJECTED
    assert "waited" in ended.reason
    assert "concurrency_limit" in ended.reason
    assert "wait limit 0 s" in ended.reason


def test_a_parked_task_is_published_when_due(redis_client: object) -> None:
    state = fast_state(redis_client)
    ledger = Ledger(state)
    due = int(time.time() * 1000) + 300
    ledger.record_published("acme", "later", envelope("later"), due_ms=due, parked=True)
    assert ledger.sweep("acme").publish == ()
    time.sleep(0.35)
    (published,) = ledger.sweep("acme").publish
    assert published.task_id == "later"
    assert ledger.where("acme", "later")["where"] == "queued"


def test_the_ledger_remembers_an_ended_task_as_long_as_a_release_can_be_valid() -> None:
    """A copied release must find its task ended, never fresh (policy.signing.RELEASE_HORIZON)."""
    from governance.policy.signing import RELEASE_HORIZON
    from governance.store.state import KeyTTL

    assert KeyTTL().task_s >= RELEASE_HORIZON.total_seconds()
