"""Creates the Redis client for governance state: short timeouts, few retries, fail fast.

A governance decision must never hang a worker: connect and socket timeouts are bounded, and a
dead server surfaces as :class:`~governance.store.errors.StoreUnavailable` within a few seconds.

Three topologies: one server (``url``), a Redis Cluster (``cluster``), or a primary watched by
Sentinels (``sentinels``): then every connection asks the Sentinels where the primary is when
it connects, and a connection to a primary that died or was demoted (a failover) is dropped and
made again to the one they promoted; ``url`` gives only the database and the credentials. While
a failover runs, calls fail as in any outage of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel


def connect(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float = 2.0,
    sentinels: Sequence[tuple[str, int]] = (),
    sentinel_master: str = "governance",
    sentinel_password: str | None = None,
) -> Any:
    """A client for ``url``; a :class:`RedisCluster` when ``cluster`` is true; a client of the
    primary named ``sentinel_master`` by ``sentinels`` when there are any."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)
    if sentinels:
        return _sentinel_master(
            url, sentinels, sentinel_master, sentinel_password, timeout_s, retry
        )
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry,
        health_check_interval=30,
    )


def _sentinel_master(
    url: str,
    sentinels: Sequence[tuple[str, int]],
    master: str,
    sentinel_password: str | None,
    timeout_s: float,
    retry: Retry,
) -> redis.Redis:
    """A client of the primary the Sentinels name (``url``: its database and credentials)."""
    parts = urlsplit(url)
    options: dict[str, Any] = {}
    path = parts.path.strip("/")
    if path:
        options["db"] = int(path)
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        options["ssl"] = True
    manager = Sentinel(
        list(sentinels),
        sentinel_kwargs={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "password": sentinel_password,
        },
    )
    client: redis.Redis = manager.master_for(
        master,
        retry=retry,
        health_check_interval=30,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        **options,
    )
    return client
