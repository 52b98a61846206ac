"""GOVERNANCE_STATE_DURABILITY in one process: Celery's test worker (threads) serves a governed
app whose state is a Valkey with AOF (WAITAOF) and whose broker is a Redis of its own, so the
broker's unacknowledged messages can be read.

With ``replicas`` (1) and no replica, a task that waits is not confirmed: its message stays
unacknowledged, however many rounds the confirmations make; once a replica of the state
server exists, the message is acknowledged. A publisher is returned a task that waits from
publication only once it is confirmed, and is told ``NotDurable`` when it cannot be.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from governance.embedded import EmbeddedRedis, RedisBinaries
from governance.integration import GovernanceRuntime, governance_context
from governance.integration.runtime import runtime_for
from governance.policy.context import ActionContext
from governance.store.durability import NotDurable
from tests.integration.apps import governed_app
from tests.polling import wait_until

POLICY = """
version: 1
tools:
  durable.gate: compute
  durable.echo: compute
defaults:
  long_running: disabled
tenants:
  acme:
    allowed_tools: [durable.gate, durable.echo]
    concurrency: 1
"""

GATES: dict[str, threading.Event] = {}
RUNS: dict[str, int] = {}


@pytest.fixture(scope="module")
def state_server(valkey_binaries: RedisBinaries) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(appendonly=True, binaries=valkey_binaries) as server:
        yield server


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def app(
    state_server: EmbeddedRedis, broker: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Celery]:
    app = governed_app(
        "durable",
        POLICY,
        tmp_path_factory,
        broker_url=broker.url,
        state_url=state_server.url,
        state_durability="replicas",
        state_durable_replicas=1,
        state_durable_timeout_s=1,
        state_timeout_s=1,
    )
    app.conf.update(task_track_started=True)

    @app.task(name="durable.gate", shared=False)
    def gate(key: str) -> str:
        GATES.setdefault(key, threading.Event()).wait(30)
        return key

    @app.task(name="durable.echo", shared=False)
    def echo(text: str) -> str:
        RUNS[text] = RUNS.get(text, 0) + 1
        return text

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        yield app
    app.close()


def _unacked(broker: EmbeddedRedis) -> set[str]:
    """The ids of the tasks whose messages the broker holds unacknowledged."""
    client = redis.Redis.from_url(broker.url)
    try:
        found = set()
        for raw in client.hvals("unacked"):
            message, _exchange, _key = json.loads(raw)
            found.add(message["headers"]["id"])
        return found
    finally:
        client.close()


def test_a_waiting_task_is_acknowledged_only_once_a_replica_has_its_record(
    app: Celery, state_server: EmbeddedRedis, broker: EmbeddedRedis
) -> None:
    runtime: GovernanceRuntime = runtime_for(app)
    key = f"gate-{uuid.uuid4().hex[:6]}"
    GATES[key] = threading.Event()
    context = ActionContext(tenant="acme", agent="a", run="r1")
    with governance_context(context):
        running = app.tasks["durable.gate"].delay(key)
        wait_until(lambda: running.state == "STARTED", 10, "the gate task to start")
    # Sent to the broker (as a message published before the slot was taken would be): its
    # delivery waits in the wait list.
    waiting_id = str(uuid.uuid4())
    runtime.send_raw(
        "durable.echo",
        (key,),
        {},
        task_id=waiting_id,
        headers={"gov_context": context.model_dump_json(exclude_none=True)},
    )
    waiting = app.AsyncResult(waiting_id)
    wait_until(lambda: waiting.state == "DEFERRED", 10, "the second task to wait")
    rounds = runtime.confirmations.rounds
    wait_until(
        lambda: runtime.confirmations.rounds >= rounds + 3, 20, "three rounds of confirmation"
    )
    assert waiting_id in _unacked(broker)  # no replica: not acknowledged

    with EmbeddedRedis(
        appendonly=True,
        binaries=state_server.binaries,
        extra_args=("--replicaof", "127.0.0.1", str(state_server.port)),
    ):
        wait_until(lambda: waiting_id not in _unacked(broker), 20, "the acknowledgement")
        GATES[key].set()
        assert running.get(timeout=20) == key
        assert waiting.get(timeout=20) == key
    assert RUNS[key] == 1


def test_a_publisher_returns_a_waiting_task_once_confirmed_and_refuses_it_otherwise(
    app: Celery, state_server: EmbeddedRedis
) -> None:
    runtime = runtime_for(app)
    key = f"gate-{uuid.uuid4().hex[:6]}"
    GATES[key] = threading.Event()
    context = ActionContext(tenant="acme", agent="a", run="r2")
    with governance_context(context):
        running = app.tasks["durable.gate"].delay(key)
        wait_until(lambda: running.state == "STARTED", 10, "the gate task to start")
        # No replica: the task waits from publication, and is not confirmed within 1 s.
        with pytest.raises(NotDurable, match="recorded in the state Redis but was not confirmed"):
            app.tasks["durable.echo"].delay(f"{key}-refused")
        with EmbeddedRedis(
            appendonly=True,
            binaries=state_server.binaries,
            extra_args=("--replicaof", "127.0.0.1", str(state_server.port)),
        ) as replica:
            replica_client = redis.Redis.from_url(replica.url)
            wait_until(
                lambda: replica_client.info("replication")["master_link_status"] == "up",
                20,
                "the replica to sync",
            )
            replica_client.close()
            confirmed = runtime.confirmations.confirmed
            waiting = app.tasks["durable.echo"].delay(f"{key}-accepted")
            assert runtime.confirmations.confirmed > confirmed
            assert waiting.state == "DEFERRED"
            GATES[key].set()
            assert waiting.get(timeout=20) == f"{key}-accepted"
    assert running.get(timeout=20) == key
