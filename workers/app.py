"""The Celery app of the example deployment: governed tool and LLM tasks on a Redis broker.

Run a worker with ``celery -A workers.app worker`` (it sends task events while a monitor such
as Flower asks for them; ``-E`` would send them always). Settings come from ``GOVERNANCE_*``
environment variables (see ``governance/settings.py``); the policy file is loaded at start, and
a worker refuses to start, with the file, field and reason, when it is invalid. Every worker
process makes itself non-dumpable when it starts (``workers.hardening``), so the commands the
``shell`` tool runs as the worker's user cannot read its secrets from ``/proc``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from governance.integration import govern
from governance.policy.engine import Policy
from governance.policy.loader import ConfigError
from governance.settings import GovernanceSettings
from workers.hardening import make_process_non_dumpable
from workers.llm import register_llm_task
from workers.tasks import register_tool_tasks


def create_app(settings: GovernanceSettings | None = None) -> Celery:
    """A governed Celery app for ``settings`` (default: from the environment)."""
    settings = settings or GovernanceSettings()
    try:
        policy = Policy.from_file(settings.config_path)
    except ConfigError as exc:
        raise SystemExit(f"refusing to start: the governance policy is invalid:\n{exc}") from None
    app = Celery("workers", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(
        result_extended=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )
    govern(app, settings, policy)
    register_tool_tasks(app, settings)
    register_llm_task(app, settings)
    return app


def harden_worker_process(**_: Any) -> None:
    """Celery's `worker_init` (main process) and `worker_process_init` (pool processes)."""
    make_process_non_dumpable()


worker_init.connect(harden_worker_process, weak=False)
worker_process_init.connect(harden_worker_process, weak=False)

app = create_app()
