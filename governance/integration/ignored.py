"""The garbage Celery leaves for every delivery that ends with ``Ignore``, collected in batches."""

from __future__ import annotations

import gc
import time


class IgnoredDeliveries:
    """Collects the garbage that Celery leaves behind for every ``Ignore`` (a waiting, held or
    duplicate delivery ends with one).

    Celery keeps the ``Ignore`` with an ``ExceptionInfo`` of its tracer's frame, in a reference
    cycle through that frame; the cycle survives into the oldest generation and is freed only by
    a full collection, which Python runs rarely: a backlog of waiting tasks grew each worker
    process by about 100 KB per wait. A full collection after every ``BATCH`` such deliveries
    (or after ``MAX_AGE_S`` with any) keeps that bounded, at a few milliseconds each.
    """

    BATCH = 50
    MAX_AGE_S = 5.0

    def __init__(self) -> None:
        self._count = 0
        self._since = time.monotonic()

    def noted(self) -> None:
        self._count += 1
        if self._count >= self.BATCH:
            self.collect()

    def maybe_collect(self) -> None:
        if self._count and time.monotonic() - self._since >= self.MAX_AGE_S:
            self.collect()

    def collect(self) -> None:
        self._count = 0
        self._since = time.monotonic()
        gc.collect()
