"""Private, real Redis processes (a single server or a small cluster) for tests and demos.

Everything in the project keeps its shared state in Redis, so tests run against a genuine
``redis-server`` started here rather than a fake.
"""

from governance.embedded.redis_cluster import EmbeddedRedisCluster
from governance.embedded.redis_server import (
    EmbeddedRedis,
    RedisBinaries,
    RedisBinaryNotFound,
    RedisStartError,
    find_redis_binaries,
)

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "RedisBinaries",
    "RedisBinaryNotFound",
    "RedisStartError",
    "find_redis_binaries",
]
