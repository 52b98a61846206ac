"""Creates the Redis client for governance state: short timeouts, few retries, fail fast.

A governance decision must never hang a worker: connect and socket timeouts are bounded, and a
dead server surfaces as :class:`~governance.store.errors.StoreUnavailable` within a few seconds.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry


def connect(url: str, *, cluster: bool = False, timeout_s: float = 2.0) -> Any:
    """A client for ``url``; a :class:`RedisCluster` when ``cluster`` is true."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)
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
