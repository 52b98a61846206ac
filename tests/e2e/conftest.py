"""End-to-end fixtures: a broker, a separate state Redis, real `celery worker` processes.

The session's fixtures are parametrized by ``broker_kind``: Redis, and RabbitMQ (a private node
whose ``consumer_timeout`` is shortened to 10 s, so a delivery held unacknowledged longer kills
the worker's channel as it would after 30 minutes in production); pytest runs all tests of one
broker, then of the other. A test runs on the Redis broker only, unless what it shows depends on
the broker (waiting, nothing lost, retries, countdowns): those are marked ``both_brokers`` and
run on both; ``rabbitmq_broker`` and ``redis_broker`` tests run on that one broker. Where
RabbitMQ is not installed its runs skip, saying how to install it
(``GOVERNANCE_REQUIRE_RABBITMQ=1`` in CI makes them fail instead). Results go to a Redis on both.

The worker is started once per broker with the test policy (``governance-e2e.yaml``) and short
timings (lease 2 s, visibility timeout 6 s, countdowns over 2 s parked), and the test process
publishes through an app built from the same settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Queue

from governance.embedded import (
    EmbeddedRabbitMQ,
    EmbeddedRedis,
    EmbeddedSentinelGroup,
    RedisBinaries,
)
from governance.embedded.processes import log_tail, stop_processes
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.policy.signing import (
    load_private_key,
    new_private_key,
    private_key_pem,
    public_key_text,
)
from governance.settings import GovernanceSettings
from governance.store.audit import AuditEntry
from governance.store.audit_verify import verify_all
from governance.store.deployment import write_marker
from governance.store.keys import DEPLOYMENT_CHAIN, DeploymentKeys
from tests.conftest import start_rabbitmq
from tests.e2e.observer import ObserverServer
from tests.polling import wait_until

HERE = Path(__file__).parent
CELERY = str(Path(sys.executable).with_name("celery"))


class WorkerProcess:
    """A real `celery -A workers.app worker` process (prefork), with its log kept for failures.

    ``app_module`` serves another app; ``queues`` (``-Q``) keeps it to its own queues. Started
    as documented, without ``-E``: it sends task events while a monitor (Flower) asks for them.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 4,
        name: str = "e2e",
        app_module: str = "workers.app",
        queues: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.env = env
        self.extra_args = extra_args
        self.log_path = log_path
        self.concurrency = concurrency
        self.name = name
        self.app_module = app_module
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def node_name(self) -> str:
        return f"{self.name}-{os.getpid()}@{socket.gethostname()}"

    def start(self, app: Celery) -> None:
        self._app = app
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                self.app_module,
                "worker",
                *(["-Q", self.queues] if self.queues else []),
                "-P",
                "prefork",
                "-c",
                str(self.concurrency),
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                *self.extra_args,
                "-n",
                f"{self.name}-{os.getpid()}@%h",
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: (
                    self.process is not None
                    and (self.process.poll() is not None or app.control.ping(timeout=0.5))
                ),
                timeout_s=60,
                what="the celery worker to answer a ping",
            )
        except AssertionError:
            self.kill()
            raise AssertionError(f"the worker never answered a ping:\n{self.log_tail()}") from None
        if self.process.poll() is not None:
            self._log.close()
            raise RuntimeError(f"the worker exited at start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_processes([self.process])
        self._log.close()

    def children(self) -> list[int]:
        """The pool's processes (children of the worker's main process)."""
        if self.process is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                found.append(int(entry.name))
        return found

    def busy_children(self) -> list[int]:
        """Pool processes running a task right now (as the worker reports them)."""
        replies = self._app.control.inspect(destination=[self.node_name], timeout=1).active()
        return [t["worker_pid"] for tasks in (replies or {}).values() for t in tasks]

    def tasks_done(self) -> int:
        """How many tasks this worker has received so far (as it reports them)."""
        replies = self._app.control.inspect(destination=[self.node_name], timeout=1).stats()
        return sum(sum((r.get("total") or {}).values()) for r in (replies or {}).values())

    def kill(self) -> None:
        """SIGKILL the whole worker at once: its main process and every pool process."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in [*self.children(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)


BROKERS = ("redis", "rabbitmq")
#: The e2e RabbitMQ node's consumer_timeout (the workers are told the same).
E2E_CONSUMER_TIMEOUT_S = 10


def brokers_of(item: pytest.Item) -> tuple[str, ...]:
    """The brokers a test runs on: those its ``redis_broker`` / ``rabbitmq_broker`` markers name
    (about one broker's own mechanics), both with ``both_brokers`` (what depends on the
    broker), else the Redis broker only."""
    only = tuple(b for b in BROKERS if item.get_closest_marker(f"{b}_broker"))
    if only:
        return only
    return BROKERS if item.get_closest_marker("both_brokers") else ("redis",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test runs on the brokers :func:`brokers_of` names, and is deselected on the other."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("broker_kind")
        if kind is not None and kind not in brokers_of(item):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """The broker of this half of the session: ``redis`` or ``rabbitmq``."""
    return str(request.param)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedRedis]:
    """The Redis of the broker (on the Redis half) and of the results (on both)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def e2e_rabbitmq() -> Iterator[EmbeddedRabbitMQ]:
    node = start_rabbitmq(consumer_timeout_ms=E2E_CONSUMER_TIMEOUT_S * 1000)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def broker_url(broker_kind: str, broker: EmbeddedRedis, request: pytest.FixtureRequest) -> str:
    """The Celery broker of this half: the broker Redis, or the RabbitMQ node."""
    if broker_kind == "redis":
        return broker.url
    node: EmbeddedRabbitMQ = request.getfixturevalue("e2e_rabbitmq")
    return node.url


@contextlib.contextmanager
def fresh_broker_url(broker_kind: str, request: pytest.FixtureRequest, name: str) -> Iterator[str]:
    """A broker of its own for one test: a new Redis, or a new vhost of the RabbitMQ node."""
    if broker_kind == "redis":
        with EmbeddedRedis() as server:
            yield server.url
        return
    node: EmbeddedRabbitMQ = request.getfixturevalue("e2e_rabbitmq")
    vhost = f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        yield node.vhost(vhost)
    finally:
        node.rabbitmqctl("delete_vhost", vhost)


@dataclass
class Deployment:
    """A broker, a state Redis and workers of their own, with a publisher app: for tests that
    kill workers, stop Redis or edit the policy file without disturbing the others."""

    broker_url: str
    state: EmbeddedRedis
    env: dict[str, str]
    app: Celery
    tmp: Path
    workers: list[WorkerProcess]

    def start_worker(
        self, name: str, concurrency: int = 4, extra_args: tuple[str, ...] = ()
    ) -> WorkerProcess:
        worker = WorkerProcess(
            self.env,
            self.tmp / f"{name}.log",
            concurrency=concurrency,
            name=name,
            extra_args=extra_args,
        )
        worker.start(self.app)
        self.workers.append(worker)
        return worker

    @property
    def runtime(self) -> GovernanceRuntime:
        return runtime_for(self.app)


def _db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


@pytest.fixture
def make_deployment(
    e2e_env: dict[str, str],
    broker_kind: str,
    broker: EmbeddedRedis,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[Callable[..., Deployment]]:
    """``make_deployment(**GOVERNANCE_overrides)``: a :class:`Deployment` on this half's broker
    kind (a new Redis, or a new RabbitMQ vhost), stopped after the test. Its state Redis is a
    new server (``state_binaries``: of that server, e.g. Valkey), or the primary that the
    Sentinels of ``sentinels`` name (``Deployment.state``: the group's first primary)."""
    from workers.app import create_app

    with contextlib.ExitStack() as stack:
        made: list[Deployment] = []

        def make(
            state_binaries: RedisBinaries | None = None,
            sentinels: EmbeddedSentinelGroup | None = None,
            **overrides: str,
        ) -> Deployment:
            broker_url = stack.enter_context(fresh_broker_url(broker_kind, request, "own"))
            if sentinels is None:
                state = stack.enter_context(EmbeddedRedis(appendonly=True, binaries=state_binaries))
                where = {"GOVERNANCE_STATE_REDIS_URL": state.url}
            else:
                state = sentinels.servers[0]
                where = {
                    "GOVERNANCE_STATE_REDIS_URL": "redis:///0",
                    "GOVERNANCE_STATE_SENTINELS": sentinels.sentinels_setting,
                    "GOVERNANCE_STATE_SENTINEL_MASTER": sentinels.master_name,
                }
            settings_env = {
                **e2e_env,
                "GOVERNANCE_BROKER_URL": broker_url,
                **where,
                # Results outside the state Redis, which the outage tests stop.
                "GOVERNANCE_RESULT_BACKEND": _db(broker.url, 5),
                **overrides,
            }
            env = {**os.environ, **settings_env}
            env.pop("REDIS_URL", None)
            app = create_app(
                GovernanceSettings(
                    **{k.removeprefix("GOVERNANCE_").lower(): v for k, v in settings_env.items()}
                )
            )
            deployment = Deployment(broker_url, state, env, app, tmp_path, [])
            made.append(deployment)
            return deployment

        try:
            yield make
        finally:
            for deployment in made:
                for worker in deployment.workers:
                    worker.kill()
                # The publisher's owed audit seals, while its state Redis still runs (a
                # Sentinel group of the test stops before this process exits).
                deployment.runtime.flush_owed_seals()
                deployment.app.close()


@contextlib.contextmanager
def consuming_paused(app: Celery, queue: str = "celery", workers: int = 1) -> Iterator[None]:
    """The ``workers`` workers of ``app``'s broker stop taking messages from ``queue``
    meanwhile: what is published stays there (to be counted, removed, or revoked before any
    worker takes it). Each step returns once every worker has answered (not after a timeout)."""
    replies = app.control.cancel_consumer(queue, reply=True, timeout=5, limit=workers)
    assert len(replies) == workers, replies
    try:
        yield
    finally:
        app.control.add_consumer(queue, reply=True, timeout=5, limit=workers)


def queue_depth(app: Celery, queue: str = "celery") -> int:
    """Messages ready in ``queue`` of ``app``'s broker (either kind)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            return int(channel._size(queue))  # an empty queue is no key: "not found" to kombu
        return int(channel.queue_declare(queue=queue, passive=True).message_count)


def remove_from_queue(app: Celery, task_id: str, queue: str = "celery") -> int:
    """Take the messages of ``task_id`` out of ``queue`` (the others go back); how many.

    What a broker failure, or a Redis broker's BRPOP gap, does to a message no one took yet.
    """
    removed = 0
    with app.connection_for_write() as conn:
        bound = Queue(queue).bind(conn.default_channel)
        others = []
        while (message := bound.get(no_ack=False)) is not None:
            if message.headers.get("id") == task_id:
                message.ack()
                removed += 1
            else:
                others.append(message)
        for message in others:
            message.requeue()
    return removed


@pytest.fixture(scope="session")
def state_server() -> Iterator[EmbeddedRedis]:
    """The state Redis, with AOF on, so a restart keeps held tasks (as in production)."""
    with EmbeddedRedis(appendonly=True) as server:
        yield server


@pytest.fixture(scope="session")
def observer(broker_kind: str) -> Iterator[ObserverServer]:
    """The test HTTP server; one per broker half, so its counts start from zero on each."""
    server = ObserverServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def workspace(broker_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file tools' workspace; one per broker half (the tests look for the files they made)."""
    return tmp_path_factory.mktemp(f"workspace-{broker_kind}")


REVIEWERS = ("alice", "bob", "carol", "dana")


@pytest.fixture(scope="session")
def reviewer_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private key file per reviewer of the test policy (as `govctl reviewers keygen` writes)."""
    folder = tmp_path_factory.mktemp("reviewers")
    keys = {}
    for name in REVIEWERS:
        keys[name] = folder / f"{name}.key"
        keys[name].write_bytes(private_key_pem(new_private_key()))
    return keys


@pytest.fixture(scope="session")
def keys(reviewer_keys: dict[str, Path]) -> dict[str, Ed25519PrivateKey]:
    """The reviewers' private keys, loaded (for the tests that decide in-process)."""
    return {name: load_private_key(path.read_bytes()) for name, path in reviewer_keys.items()}


@pytest.fixture(scope="session")
def e2e_policy(
    reviewer_keys: dict[str, Path],
    observer: ObserverServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The test policy with the reviewers' public keys and the test server's URL filled in."""
    text = (HERE / "governance-e2e.yaml").read_text()
    for name, path in reviewer_keys.items():
        public = public_key_text(load_private_key(path.read_bytes()).public_key())
        text = text.replace(f"{{{{key:{name}}}}}", public)
    text = text.replace("{{observer}}", observer.base_url)
    rendered = tmp_path_factory.mktemp("policy") / "governance-e2e.yaml"
    rendered.write_text(text)
    return rendered


@pytest.fixture(scope="session")
def e2e_env(
    broker_url: str,
    broker: EmbeddedRedis,
    state_server: EmbeddedRedis,
    observer: ObserverServer,
    workspace: Path,
    e2e_policy: Path,
) -> dict[str, str]:
    return {
        "GOVERNANCE_BROKER_URL": broker_url,
        "GOVERNANCE_RESULT_BACKEND": broker.url,
        "GOVERNANCE_CONSUMER_TIMEOUT_S": str(E2E_CONSUMER_TIMEOUT_S),
        "GOVERNANCE_STATE_REDIS_URL": state_server.url,
        "GOVERNANCE_CONFIG_PATH": str(e2e_policy),
        "GOVERNANCE_WORKSPACE_DIR": str(workspace),
        "GOVERNANCE_LEASE_MS": "2000",
        "GOVERNANCE_VISIBILITY_TIMEOUT_S": "6",
        "GOVERNANCE_MAX_COUNTDOWN_S": "2",
        "GOVERNANCE_SWEEP_POLL_S": "0.2",
        # A published task unseen for 3 s is published again (the reconciler's bound here).
        "GOVERNANCE_RECONCILE_AFTER_S": "3",
        "GOVERNANCE_AUDIT_CHECKPOINT_S": "1",
        "GOVERNANCE_AUDIT_ADOPT_S": "1",
        "GOVERNANCE_SEAL_GRACE_S": "5",
        # govctl's expiry test expires holds itself; the workers' own sweep would race it.
        "GOVERNANCE_HELD_SWEEP_S": "3600",
        "GOVERNANCE_STATE_TIMEOUT_S": "1",
        "GOVERNANCE_LLM_BASE_URL": observer.base_url + "/v1",
        # The test server holds some calls (model local-hold) longer than this: a timeout after
        # the request was sent.
        "GOVERNANCE_LLM_TIMEOUT_S": "2",
        "GOVERNANCE_AUDIT_KEY": "e2e-audit-key",
    }


@pytest.fixture(scope="session")
def app(e2e_env: dict[str, str]) -> Celery:
    """The publisher side: an app built from the workers' settings, in the test process."""
    from workers.app import create_app

    settings = GovernanceSettings(
        **{k.removeprefix("GOVERNANCE_").lower(): v for k, v in e2e_env.items()}
    )
    return create_app(settings)


@pytest.fixture(scope="session")
def worker(
    app: Celery, e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    env = {**os.environ, **e2e_env}
    env.pop("REDIS_URL", None)
    process = WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log")
    process.start(app)
    yield process
    process.stop()


@pytest.fixture
def runtime(app: Celery, worker: WorkerProcess, state_server: EmbeddedRedis) -> GovernanceRuntime:
    """The publisher's runtime, with the state Redis flushed before the test (and marked as the
    deployment's again at once, as the workers would within a heartbeat, so govctl need not
    wait for them; the flag that says the workers' task events are on, if it was there, is
    kept, as they would write it again within a second)."""
    client = redis.Redis.from_url(state_server.url)
    events_ttl_ms = client.pttl(DeploymentKeys.events_on)
    client.flushall()
    if events_ttl_ms > 0:
        client.set(DeploymentKeys.events_on, "e2e-fixture", px=events_ttl_ms)
    client.close()
    runtime = runtime_for(app)
    write_marker(runtime.state, "e2e-fixture")
    return runtime


def to_broker(
    app: Celery,
    task_name: str,
    kwargs: dict[str, Any],
    headers: dict[str, Any],
    task_id: str | None = None,
) -> Any:
    """Publish straight to the broker, as anyone who can reach it may: none of the publisher's
    checks (the worker must decide on its own)."""
    task_id = task_id or str(uuid.uuid4())
    runtime_for(app).send_raw(task_name, (), kwargs, task_id=task_id, headers=headers)
    return app.AsyncResult(task_id)


def audit_of(runtime: GovernanceRuntime, task_id: str) -> list[AuditEntry]:
    """The decision entries about one task, in every chain, oldest first."""
    chains = (*runtime.policy.tenant_names, DEPLOYMENT_CHAIN)
    return [
        e
        for chain in chains
        for e in runtime.audit_log.records(chain)
        if e.fields.get("task_id") == task_id
    ]


def verify_audit(runtime: GovernanceRuntime) -> list[str]:
    """Every break in every audit chain (none expected)."""
    key = runtime.settings.audit_key.get_secret_value().encode()
    chains = (*runtime.policy.tenant_names, DEPLOYMENT_CHAIN)
    reports = verify_all(runtime.audit_log, key, chains)
    return [f"{r.chain}: {b.reason}" for r in reports for b in r.breaks]


def types_of(entries: list[AuditEntry]) -> list[str]:
    return [e.fields["type"] for e in entries]
