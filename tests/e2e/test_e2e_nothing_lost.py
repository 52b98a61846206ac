"""Nothing lost: every governed task ends, through worker kills, state outages and lost messages.

The kill and outage scenarios run on a deployment of their own (a broker of their own, a new
Redis or a new RabbitMQ vhost; a state Redis with AOF; their own worker processes), so killing
its workers or stopping its Redis disturbs no other test. Like every e2e test, they run on both
brokers (RabbitMQ gives a dead worker's unacknowledged deliveries back at once, Redis after the
visibility timeout). Bounds stated in the README, at the end-to-end settings (lease 2 s,
reconciler grace 3 s, sweep every 0.2 s, visibility timeout 6 s): a killed worker's tasks are
published again within lease + grace + sweep, about 5 s.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery import Celery

from governance.integration import GovernanceHeaders, ResultLost, governance_context
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.settings import GovernanceSettings
from tests.conftest import server_binaries
from tests.e2e.conftest import (
    Deployment,
    WorkerProcess,
    audit_of,
    consuming_paused,
    remove_from_queue,
    to_broker,
    types_of,
    verify_audit,
    wait_until,
)
from tests.e2e.observer import ObserverServer

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow, pytest.mark.both_brokers]

#: Recovery bound after the whole worker is killed (stated in the README): the reconciler
#: publishes what the dead worker held within about 5 s; the rest is the remaining work.
RECOVERY_BOUND_S = 45


def ctx(tenant: str = "t-load", run: str = "run-lost") -> ActionContext:
    return ActionContext(tenant=tenant, agent="agent-1", run=run)


@pytest.fixture
def deployment(
    make_deployment: Callable[..., Deployment], request: pytest.FixtureRequest
) -> Deployment:
    """A deployment of its own; its state Redis is of the server ``request.param`` names
    (``redis``, the default, or ``valkey``: an outage is also run on Valkey 8, whose AOF, a
    manifest and several files, must come back as whole)."""
    kind = getattr(request, "param", "redis")
    return make_deployment(state_binaries=server_binaries(kind))


def _publish_slow(
    app: Celery, observer: ObserverServer, key: str, count: int, ms: int
) -> list[Any]:
    url = f"{observer.base_url}/slow?key={key}&ms={ms}"
    with governance_context(ctx()):
        return [app.tasks["tools.http_get"].delay(url=url) for _ in range(count)]


def _states(results: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.state] = counts.get(result.state, 0) + 1
    return counts


def test_sigkilled_pool_children_then_the_whole_worker_lose_nothing(
    deployment: Deployment, observer: ObserverServer
) -> None:
    first = deployment.start_worker("doomed")
    results = _publish_slow(deployment.app, observer, "kill", 120, 300)
    wait_until(lambda: _states(results).get("SUCCESS", 0) >= 10, 60, "some tasks to succeed")
    killed: set[int] = set()
    while len(killed) < 3:  # three pool children, each while it runs a task
        busy = wait_until(
            lambda: [pid for pid in first.busy_children() if pid not in killed],
            30,
            "a pool child running a task",
        )
        try:
            os.kill(busy[0], signal.SIGKILL)
        except ProcessLookupError:
            continue  # it exited after the worker listed it busy: take another
        killed.add(busy[0])
        time.sleep(0.3)
    first.kill()  # then the whole worker: parent and every child, at once
    killed_at = time.monotonic()
    deployment.start_worker("successor")
    for result in results:
        result.get(timeout=RECOVERY_BOUND_S + 60, propagate=False)
    elapsed = time.monotonic() - killed_at
    # A kill that falls between a task's settlement and its result write leaves it ended: it
    # ran once, its usage counted, and its next delivery stores ResultLost instead of running
    # it again (by design). Only the killed processes' running tasks can be caught so: the 3
    # children, then the worker's 4.
    lost = [r for r in results if r.state != "SUCCESS"]
    assert all(isinstance(r.result, ResultLost) for r in lost), [
        (r.id, r.state, repr(r.result)) for r in lost
    ]
    assert len(lost) <= 3 + 4, [(r.id, r.state, repr(r.result)) for r in lost]
    for r in lost:
        assert "task_finished" in types_of(audit_of(deployment.runtime, r.id)), r.id
    assert elapsed < RECOVERY_BOUND_S, f"recovery took {elapsed:.1f} s"
    assert observer.observations.max_in_flight["kill"] <= 3
    status = deployment.runtime.ledger.status("t-load", overdue_after_ms=0)
    assert (status.open, status.running, status.waiting) == (0, 0, 0)
    print(f"\nall 120 done {elapsed:.1f} s after the whole worker was killed")


def test_a_worker_sigkilled_mid_task_gives_the_slot_back_within_a_lease_and_the_task_completes(
    deployment: Deployment, observer: ObserverServer
) -> None:
    """Concurrency 1, two workers: A runs on one (the victim), B waits for the slot; the victim
    is SIGKILLed.

    The slot comes back when the dead holder's lease expires (2 s here), whenever the broker
    gives the message back (RabbitMQ: at once; Redis: after the reconciler's grace); A is
    delivered again and runs to completion, and B runs too.
    """
    lease_ms = int(deployment.env["GOVERNANCE_LEASE_MS"])
    workers = [deployment.start_worker("one"), deployment.start_worker("two")]
    key = f"killed-mid-task-{uuid.uuid4().hex[:8]}"  # the observer outlives one deployment
    slow = f"{observer.base_url}/slow?key={key}&ms=6000"
    quick = f"{observer.base_url}/slow?key={key}&ms=300"
    tool = deployment.app.tasks["tools.http_get"]
    with governance_context(ctx("t-conc", run="run-killed")):
        a = tool.delay(url=slow)
        victim = wait_until(
            lambda: next((w for w in workers if w.busy_children()), None),
            30,
            "A to run on one of the workers",
        )
        # A's pool process is busy before its request reaches the observer.
        wait_until(lambda: observer.observations.in_flight[key] == 1, 30, "A's request")
        b = tool.delay(url=quick)
    runtime = deployment.runtime
    wait_until(
        lambda: runtime.ledger.where("t-conc", b.id).get("where") == "waiting",
        30,
        "B to wait for the slot",
    )
    assert observer.observations.in_flight[key] == 1  # A, still running
    victim.kill()
    killed_ms = int(time.time() * 1000)
    assert a.get(timeout=60)["status"] == 200
    assert b.get(timeout=60)["status"] == 200
    entries = {r.id: audit_of(runtime, r.id) for r in (a, b)}
    # A's second delivery may first wait for the slot its dead holder still leased.
    ran = {r.id: [t for t in types_of(entries[r.id]) if t != "waiting"] for r in (a, b)}
    assert ran[a.id] == ["admitted", "admitted", "task_finished"]
    assert ran[b.id] == ["admitted", "task_finished"]
    after_kill = min(
        int(e.fields["ts"])
        for found in entries.values()
        for e in found
        if e.fields["type"] == "admitted" and int(e.fields["ts"]) >= killed_ms
    )
    assert after_kill - killed_ms <= lease_ms + 3000, "the slot came back later than one lease"
    assert runtime.ledger.status("t-conc", overdue_after_ms=0).open == 0


# 8 s outlasts the lease and the Redis broker's visibility timeout (6 s here): on the Redis broker;
# 20 s outlasts RabbitMQ's consumer timeout too (10 s here): on RabbitMQ. The short one runs on
# Valkey 8 too (the state store's persistence on today's servers).
@pytest.mark.parametrize(
    ("outage_s", "deployment"),
    [
        pytest.param(8, "redis", marks=pytest.mark.redis_broker, id="8-redis"),
        pytest.param(20, "redis", marks=pytest.mark.rabbitmq_broker, id="20-redis"),
        pytest.param(8, "valkey", marks=pytest.mark.redis_broker, id="8-valkey"),
    ],
    indirect=["deployment"],
)
def test_a_state_store_outage_defers_and_fails_nothing(
    deployment: Deployment, observer: ObserverServer, outage_s: int
) -> None:
    deployment.start_worker("steady")
    key = f"outage-{outage_s}-{uuid.uuid4().hex[:8]}"  # the observer outlives one deployment
    results = _publish_slow(deployment.app, observer, key, 60, 300)
    wait_until(lambda: _states(results).get("SUCCESS", 0) >= 3, 60, "some tasks to succeed")
    deployment.state.halt()
    down_at = time.time()
    time.sleep(outage_s)
    up_at = time.time()
    deployment.state.restart()
    try:
        wait_until(lambda: _states(results) == {"SUCCESS": 60}, 120, "every task to succeed")
    except AssertionError:
        ledger = deployment.runtime.ledger
        late = {r.id: ledger.where("t-load", r.id) for r in results if r.state != "SUCCESS"}
        raise AssertionError(
            f"{_states(results)}; not done: {late}\n{deployment.workers[-1].log_tail(80)}"
        ) from None
    # Nothing started while the state store was down (a body admitted just before may finish).
    starts = [start for start, _ in observer.observations.requests[key]]
    assert not [s for s in starts if down_at + 0.5 < s < up_at]
    assert observer.observations.max_in_flight[key] <= 3
    runtime = deployment.runtime
    assert runtime.ledger.status("t-load", overdue_after_ms=0).open == 0
    # Every task ran exactly once, and the audit chains held through the outage.
    assert observer.observations.counts[key] == 60
    assert verify_audit(runtime) == []


def test_a_message_deleted_from_the_broker_is_published_again_and_runs_once(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
) -> None:
    # The worker stops taking messages, the message is published, and removed from the queue
    # before anyone took it (what the BRPOP gap or a broker failure does).
    with consuming_paused(app), governance_context(ctx("t-basic", run="run-deleted")):
        result = app.tasks["tools.echo"].delay(text="lost and found")
        assert remove_from_queue(app, result.id) == 1
    assert result.get(timeout=60) == {"text": "lost and found"}
    assert types_of(audit_of(runtime, result.id)) == ["admitted", "task_finished"]
    assert runtime.ledger.republished("t-basic") >= 1
    assert runtime.ledger.where("t-basic", result.id)["where"] == "done"
    assert verify_audit(runtime) == []


def _refusing(url: str) -> str:
    """``url`` with a port nothing listens on: a broker that refuses every connection."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def test_a_task_the_broker_refused_after_its_record_is_accepted_and_runs_once(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
    e2e_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A publisher whose broker refuses connections, on the same state and results as the worker.
    from workers.app import create_app

    env = {**e2e_env, "GOVERNANCE_BROKER_URL": _refusing(e2e_env["GOVERNANCE_BROKER_URL"])}
    refusing = create_app(
        GovernanceSettings(**{k.removeprefix("GOVERNANCE_").lower(): v for k, v in env.items()})
    )
    try:
        with (
            caplog.at_level(logging.WARNING, logger="governance.publish"),
            governance_context(ctx("t-basic", run="run-refused")),
        ):
            # Recorded, then refused by the broker: accepted all the same, with a warning (an
            # error would make the caller submit it again, and the record would run both).
            result = refusing.tasks["tools.echo"].delay(text="refused, then found")
    finally:
        refusing.close()
    assert f"the broker did not take task {result.id}" in caplog.text
    assert runtime.ledger.where("t-basic", result.id)["where"] == "queued"
    # The worker's reconciler publishes the recorded message to the broker that works.
    assert app.AsyncResult(result.id).get(timeout=60) == {"text": "refused, then found"}
    assert types_of(audit_of(runtime, result.id)) == ["admitted", "task_finished"]
    assert runtime.ledger.republished("t-basic") == 1
    assert runtime.ledger.where("t-basic", result.id)["where"] == "done"
    assert verify_audit(runtime) == []


def test_a_revoked_task_leaves_the_ledger_and_is_never_published_again(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
) -> None:
    # Queued while the worker takes nothing, then revoked: the worker drops it on delivery.
    with consuming_paused(app), governance_context(ctx("t-basic", run="run-revoked")):
        result = app.tasks["tools.echo"].delay(text="never")
        app.control.revoke(result.id)
        assert runtime.ledger.where("t-basic", result.id)["where"] == "queued"
    wait_until(
        lambda: runtime.ledger.where("t-basic", result.id).get("where") == "done",
        30,
        "the revoked task to leave the ledger",
    )
    assert result.state == "REVOKED"
    entries = audit_of(runtime, result.id)
    assert types_of(entries) == ["task_revoked"]
    assert entries[0].fields["reason"] == "revoked before it ran"
    # Out of the ledger: the reconciler has nothing to publish again (it used to, forever).
    assert runtime.ledger.status("t-basic", overdue_after_ms=0).open == 0
    assert verify_audit(runtime) == []


def test_a_copy_of_a_settled_task_whose_result_was_lost_stores_one_and_never_runs_it(
    app: Celery,
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
    observer: ObserverServer,
) -> None:
    key = "result-lost"
    url = f"{observer.base_url}/slow?key={key}&ms=10"
    headers = GovernanceHeaders(context=ctx(run="run-result-lost")).to_headers()
    done = to_broker(app, "tools.http_get", {"url": url}, dict(headers))
    assert done.get(timeout=60)["status"] == 200
    # A copy of it once its result is gone (its worker died between the settlement and the
    # result write): the copy stores a result saying so, and the body never runs again.
    app.backend.forget(done.id)
    lost = to_broker(app, "tools.http_get", {"url": url}, dict(headers), task_id=done.id)
    with pytest.raises(ResultLost, match="ran and settled"):
        lost.get(timeout=60)
    assert observer.observations.counts[key] == 1
    assert types_of(audit_of(runtime, done.id)) == ["admitted", "task_finished"]
