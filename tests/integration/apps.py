"""The governed Celery apps of the in-process integration tests, built one way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from governance.integration import GovernedTask, govern
from governance.policy.engine import Policy
from governance.settings import GovernanceSettings


def governed_app(
    name: str,
    policy: str,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    broker_url: str,
    state_url: str | None = None,
    **settings: Any,
) -> Celery:
    """An app named ``name`` whose every task is governed by ``policy`` (YAML text), with the
    broker and result backend at ``broker_url``, the state at ``state_url`` (the broker's
    server by default), and ``settings`` as further governance settings."""
    policy_file = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy_file.write_text(policy)
    governance = GovernanceSettings(
        broker_url=broker_url,
        state_redis_url=state_url or broker_url,
        config_path=policy_file,
        audit_key=f"{name}-audit-key",
        **settings,
    )
    app = Celery(name, broker=broker_url, backend=broker_url, task_cls=GovernedTask)
    govern(app, governance, Policy.from_file(Path(policy_file)))
    return app
