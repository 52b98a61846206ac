"""An app whose governed tasks take a secret-named argument (``api_token``), for
``test_e2e_secrets.py``: its calls are published, held, approved, denied and shadowed, and the
planted value must show nowhere outside the call itself.

Broker and results come from ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``, governance from
the ``GOVERNANCE_*`` variables. Its results are extended (Celery stores each call's arguments
with its state), as the example deployment's are.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from governance.integration import GovernedTask

app = Celery("secrets", task_cls=GovernedTask)
app.conf.update(result_extended=True, task_track_started=True, task_default_queue="secrets")


@app.task(name="ops.lookup", shared=False)
def lookup(query: str, api_token: str) -> str:
    return f"{query}: found"


@app.task(name="ops.deploy", shared=False)
def deploy(service: str, api_token: str, options: dict[str, Any]) -> str:
    return f"deployed {service}"
