"""The Celery app of the benchmark worker: the deployment's governed app plus one plain task.

``celery -A governance.bench.bench_app worker`` serves ``workers.app.app``, which is
``create_app(GovernanceSettings())`` built from the ``GOVERNANCE_*`` variables the benchmark
sets, with ``bench.noop`` registered on it. Plain and governed tasks so share one broker, one
worker, one pool and one configuration; only governance differs. The deployment's own app is
reused rather than a second one created, because every governed app starts a parked-task pump in
the worker, and a second, idle one would add background Redis traffic to the measurement.
"""

from __future__ import annotations

from governance.bench.celery_bench import register_plain_task
from workers.app import app

register_plain_task(app)

__all__ = ["app"]
