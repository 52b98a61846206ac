"""A tiny plain Celery app (no governance) that a real worker runs in the RabbitMQ smoke test.

The worker (``celery -A tests.celery_smoke_app worker``) and the test process build the same
app: the broker and result backend come from ``SMOKE_BROKER_URL`` and ``SMOKE_RESULT_BACKEND``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

BROKER_ENV = "SMOKE_BROKER_URL"
BACKEND_ENV = "SMOKE_RESULT_BACKEND"


def create_app(broker_url: str, backend_url: str) -> Celery:
    app = Celery("smoke", broker=broker_url, backend=backend_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="smoke.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(bind=True, name="smoke.delivery_info")
    def delivery_info(self: Any) -> dict[str, Any]:
        """What the worker saw of the delivery (the ``redelivered`` flag comes from AMQP)."""
        info = self.request.delivery_info or {}
        return {key: info.get(key) for key in ("exchange", "routing_key", "redelivered")}

    return app


app = create_app(
    os.environ.get(BROKER_ENV, "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get(BACKEND_ENV, "redis://127.0.0.1:6379/0"),
)
