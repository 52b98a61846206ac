"""Fixtures for govctl's subprocess tests: its environment on the session Redis, and a runner.

No worker runs here: these tests cover what govctl does on its own (policy, held store, audit,
usage, errors); tests/e2e/test_e2e_govctl.py covers approvals against real workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from governance.store.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "governance.yaml"

Govctl = Callable[..., subprocess.CompletedProcess[str]]


def run_govctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``govctl ARGS`` as a separate process (``python -m governance.cli.main``)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("REDIS_URL", None)
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "governance.cli.main", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def cli_env(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """govctl's settings on the (flushed) session Redis: broker and state alike."""
    return {
        "GOVERNANCE_BROKER_URL": redis_url,
        "GOVERNANCE_STATE_REDIS_URL": redis_url,
        "GOVERNANCE_CONFIG_PATH": str(CONFIG),
        "GOVERNANCE_WORKSPACE_DIR": str(tmp_path / "workspace"),
        "GOVERNANCE_AUDIT_KEY": "cli-test-audit-key",
    }


@pytest.fixture
def govctl(cli_env: dict[str, str]) -> Govctl:
    """Run govctl with ``cli_env`` (plus any ``env=`` overrides)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
        return run_govctl(*args, env={**cli_env, **(env or {})}, timeout=timeout)

    return run


@pytest.fixture
def state(redis_client: redis.Redis) -> StateStore:
    return StateStore(redis_client)
