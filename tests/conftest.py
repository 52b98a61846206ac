"""Shared fixtures: real Redis servers (single and cluster) started privately for the tests.

No fakes: every fixture talks to a genuine ``redis-server``. Set ``REDIS_URL`` to use an
existing server for ``redis_url``/``redis_client`` instead of an embedded one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from governance.embedded import (
    EmbeddedRedis,
    EmbeddedRedisCluster,
    RedisBinaryNotFound,
    RedisStartError,
)


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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    """A 3-master Redis Cluster for the session; skips if it cannot be started here."""
    cluster = EmbeddedRedisCluster(3)
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


@pytest.fixture
def redis_cluster_client(redis_cluster: EmbeddedRedisCluster) -> Iterator[RedisCluster]:
    """A cluster client; every primary is flushed before the test; closed after."""
    client = RedisCluster(startup_nodes=redis_cluster.startup_nodes)
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
        yield client
    finally:
        client.close()
