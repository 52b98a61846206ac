"""A failover of the state Redis, end to end: a Valkey primary (AOF), one replica and three
Sentinels; a worker and the publisher follow the primary through the Sentinels.

The replica falls behind (stopped, and its link to the primary cut, as a replica that stops
answering is dropped); tasks move into wait lists, on the primary only: published as usual
(the tenant's two slots are held by two running tasks, so they wait from publication), and sent
straight to the broker (their deliveries wait at the worker); then the primary is killed, the
replica promoted, and the old primary comes back as its replica (its data replaced by the new
primary's). The running tasks were admitted before, and hold their slots through it.

- With ``GOVERNANCE_STATE_DURABILITY=replicas``, nobody is told a task was accepted before a
  replica has its record: the publishers wait, and are told ``NotDurable`` ("not accepted") once
  the new primary is found without the record; they publish again. The worker acknowledges no
  waiting delivery: once the new primary is found without its record, the message goes back to
  the broker and its next delivery waits there. Every task ends SUCCESS, each body ran once.
- Without it, the publishers were told DEFERRED and the waiting deliveries acknowledged before
  the failover: the new primary has no record of those tasks, the broker no message, no worker
  holds one, and their results say DEFERRED for ever. They are lost, and nobody learns of it.

Runs on the Redis broker only (the broker plays no part), on Valkey (the setting needs WAITAOF).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery

from governance.embedded import EmbeddedRedis, EmbeddedSentinelGroup, RedisBinaries
from governance.integration import GovernanceHeaders, governance_context
from governance.policy.context import ActionContext
from governance.store.durability import NotDurable
from governance.store.keys import TenantKeys
from tests.e2e.conftest import Deployment, queue_depth, to_broker, wait_until
from tests.e2e.observer import ObserverServer

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.redis_broker]

TENANT = "t-failover"
#: Published as usual (they wait from publication), and sent straight to the broker (their
#: deliveries wait at the worker).
PUBLISHED, SENT = 3, 3

SETTINGS = {
    # Longer than the failover: no running task's lease looks expired on the promoted replica.
    "GOVERNANCE_LEASE_MS": "20000",
    # The running tasks are held through the failover, longer than the e2e's 6 s and 10 s.
    "GOVERNANCE_VISIBILITY_TIMEOUT_S": "120",
    "GOVERNANCE_HTTP_TIMEOUT_S": "120",
    "GOVERNANCE_STATE_DURABLE_TIMEOUT_S": "60",
}


def ctx() -> ActionContext:
    return ActionContext(tenant=TENANT, agent="agent-1", run="run-failover")


@pytest.fixture
def group(valkey_binaries: RedisBinaries) -> Iterator[EmbeddedSentinelGroup]:
    with EmbeddedSentinelGroup(binaries=valkey_binaries, replicas=1, sentinels=3) as started:
        yield started


def _publish(app: Celery, url: str) -> Any:
    with governance_context(ctx()):
        return app.tasks["tools.http_get"].delay(url=url)


def _unacked(broker_url: str) -> set[str]:
    """The ids of the tasks whose messages the broker holds unacknowledged."""
    client = redis.Redis.from_url(broker_url)
    try:
        return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}
    finally:
        client.close()


def _fall_behind(primary: redis.Redis, replica: EmbeddedRedis) -> None:
    """The replica stops (SIGSTOP) and the primary drops it: it receives nothing more."""
    replica.pause()
    primary.client_kill_filter(_type="replica")
    wait_until(
        lambda: primary.info("replication")["connected_slaves"] == 0,
        10,
        "the primary to drop its replica",
    )


def _fail_over(
    group: EmbeddedSentinelGroup, primary: EmbeddedRedis, replica: EmbeddedRedis
) -> None:
    """The primary is killed and the replica promoted; the old primary comes back and is made a
    replica of the new one (its Sentinels would within 10 s; done here at once): what only it had
    is replaced by the new primary's data."""
    primary.kill()
    replica.resume()
    wait_until(
        lambda: group.master_address() == ("127.0.0.1", replica.port),
        30,
        "the Sentinels to promote the replica",
    )
    primary.restart()
    old = redis.Redis.from_url(primary.url)
    try:
        old.replicaof("127.0.0.1", replica.port)
        wait_until(
            lambda: old.info("replication").get("master_link_status") == "up",
            30,
            "the old primary to sync from the new one",
        )
    finally:
        old.close()


@pytest.mark.parametrize("durable", [True, False], ids=["replica-durable", "not-durable"])
def test_a_failover_to_a_replica_that_fell_behind(
    durable: bool,
    group: EmbeddedSentinelGroup,
    make_deployment: Callable[..., Deployment],
    observer: ObserverServer,
) -> None:
    settings = {**SETTINGS, "GOVERNANCE_STATE_DURABILITY": "replicas" if durable else "none"}
    deployment = make_deployment(sentinels=group, **settings)
    # Prefetch 3 (one per process): the two running tasks hold two slots; each delivery
    # awaiting its confirmation raises it by one, so all three waiting deliveries are received.
    deployment.start_worker("failover", concurrency=3)
    app = deployment.app
    primary, replica = group.servers
    on_primary = redis.Redis.from_url(primary.url)
    gate = f"held-{uuid.uuid4().hex[:8]}"
    blockers = [_publish(app, f"{observer.base_url}/gate?key={gate}&gate={gate}") for _ in "ab"]
    wait_until(lambda: observer.observations.in_flight[gate] == 2, 30, "two tasks to run")
    assert on_primary.wait(1, 5000) == 1  # the replica has everything so far

    _fall_behind(on_primary, replica)
    keys = [f"{gate}-{i}" for i in range(PUBLISHED + SENT)]
    urls = [f"{observer.base_url}/slow?key={key}&ms=50" for key in keys]
    pool = ThreadPoolExecutor(PUBLISHED)
    published: list[Future[Any]] = [pool.submit(_publish, app, url) for url in urls[:PUBLISHED]]
    headers = GovernanceHeaders(context=ctx()).to_headers()
    sent = [to_broker(app, "tools.http_get", {"url": url}, headers) for url in urls[PUBLISHED:]]
    sent_ids = {result.id for result in sent}
    wait_until(
        lambda: on_primary.zcard(TenantKeys(TENANT).waiting) == PUBLISHED + SENT,
        30,
        "every task to wait, on the primary only",
    )
    if durable:
        # Nobody is told they are accepted: no replica has their records.
        assert not [f for f in published if f.done()]
        assert sent_ids <= _unacked(deployment.broker_url)
    else:
        told = [f.result(timeout=30) for f in published]
        assert {result.state for result in told} == {"DEFERRED"}
        wait_until(
            lambda: not sent_ids & _unacked(deployment.broker_url),
            30,
            "the waiting deliveries to be acknowledged",
        )
    on_primary.close()

    _fail_over(group, primary, replica)
    observer.open_gate(gate)
    for blocker in blockers:
        blocker.get(timeout=60)
    runtime = deployment.runtime
    try:
        if durable:
            for future in published:
                with pytest.raises(NotDurable, match="was not accepted"):
                    future.result(timeout=90)
            again = [_publish(app, url) for url in urls[:PUBLISHED]]
            everything = [*blockers, *again, *sent]
            wait_until(
                lambda: all(result.state == "SUCCESS" for result in everything),
                90,
                "every task to end SUCCESS",
            )
            ran = {key: observer.observations.counts[key] for key in [gate, *keys]}
            assert ran == {gate: 2, **dict.fromkeys(keys, 1)}
            # The worker gave each waiting delivery back to the broker once the new primary
            # was found without its record (and acknowledged its next delivery once confirmed).
            log = deployment.workers[0].log_path.read_text()
            given_back = "its record is not on the state Redis (lost with a crash or a failover)"
            assert {i for i in sent_ids if f"task {i}: {given_back}" in log} == sent_ids
            wait_until(
                lambda: runtime.ledger.status(TENANT, overdue_after_ms=0).open == 0,
                30,
                "the ledger to close every task",
            )
        else:
            lost = [f.result().id for f in published] + sorted(sent_ids)
            wait_until(
                lambda: runtime.ledger.status(TENANT, overdue_after_ms=0).open == 0,
                30,
                "the two running tasks to end",
            )
            # Nothing will ever run them: no record on the new primary, no message in the
            # broker (ready or unacknowledged), none at the worker; and their results still
            # say DEFERRED.
            assert [runtime.ledger.where(TENANT, task_id) for task_id in lost] == [{}] * len(lost)
            assert queue_depth(app) == 0
            assert _unacked(deployment.broker_url) == set()
            worker = deployment.workers[0]
            inspect = app.control.inspect(destination=[worker.node_name], timeout=2)
            assert [t for tasks in (inspect.reserved() or {}).values() for t in tasks] == []
            assert {app.AsyncResult(task_id).state for task_id in lost} == {"DEFERRED"}
            assert sum(observer.observations.counts[key] for key in keys) == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
