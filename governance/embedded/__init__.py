"""Private, real Redis processes (a single server, a small cluster, a primary with replicas and
Sentinels; Redis 6.2 or Valkey 8) and RabbitMQ nodes.

Everything in the project keeps its shared state in Redis, so tests run against a genuine
``redis-server`` started here rather than a fake; a private RabbitMQ node serves the tests
that run Celery on an AMQP broker.
"""

from governance.embedded.rabbitmq import (
    EmbeddedRabbitMQ,
    RabbitMQBinaries,
    RabbitMQBinaryNotFound,
    RabbitMQStartError,
    find_rabbitmq_binaries,
)
from governance.embedded.redis_cluster import EmbeddedRedisCluster
from governance.embedded.redis_sentinel import EmbeddedSentinel, EmbeddedSentinelGroup
from governance.embedded.redis_server import (
    EmbeddedRedis,
    RedisBinaries,
    RedisBinaryNotFound,
    RedisStartError,
    find_newest_binaries,
    find_redis_binaries,
    find_valkey_binaries,
)

__all__ = [
    "EmbeddedRabbitMQ",
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "EmbeddedSentinel",
    "EmbeddedSentinelGroup",
    "RabbitMQBinaries",
    "RabbitMQBinaryNotFound",
    "RabbitMQStartError",
    "RedisBinaries",
    "RedisBinaryNotFound",
    "RedisStartError",
    "find_newest_binaries",
    "find_rabbitmq_binaries",
    "find_redis_binaries",
    "find_valkey_binaries",
]
