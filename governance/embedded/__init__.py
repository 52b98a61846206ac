"""Private, real Redis processes (a single server or a small cluster) and RabbitMQ nodes.

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
from governance.embedded.redis_server import (
    EmbeddedRedis,
    RedisBinaries,
    RedisBinaryNotFound,
    RedisStartError,
    find_redis_binaries,
)

__all__ = [
    "EmbeddedRabbitMQ",
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "RabbitMQBinaries",
    "RabbitMQBinaryNotFound",
    "RabbitMQStartError",
    "RedisBinaries",
    "RedisBinaryNotFound",
    "RedisStartError",
    "find_rabbitmq_binaries",
    "find_redis_binaries",
]
