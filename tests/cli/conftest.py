"""Fixtures for govctl's tests: its environment on the session Redis, and a runner.

No worker runs here: these tests cover what govctl does on its own (policy, held store, audit,
usage, errors), in this process (``tests.govctl_runner``) unless a test needs a process of its
own; tests/e2e/test_e2e_govctl.py covers approvals against real workers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from governance.policy.signing import (
    load_private_key,
    new_private_key,
    private_key_pem,
    public_key_text,
)
from governance.store.deployment import write_marker
from governance.store.state import StateStore
from tests.govctl_runner import ROOT, run_govctl, run_govctl_process

__all__ = ["ROOT", "run_govctl", "run_govctl_process"]
CONFIG = ROOT / "config" / "governance.yaml"

Govctl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def reviewer_keys(tmp_path: Path) -> dict[str, Path]:
    """Key files of acme's reviewers (alice, bob) and of a stranger (mallory)."""
    keys = {}
    for name in ("alice", "bob", "mallory"):
        keys[name] = tmp_path / f"{name}.key"
        keys[name].write_bytes(private_key_pem(new_private_key()))
    return keys


@pytest.fixture
def cli_config(tmp_path: Path, reviewer_keys: dict[str, Path]) -> Path:
    """The example policy with acme's reviewers' keys replaced by the test's own."""
    data = yaml.safe_load(CONFIG.read_text())
    data["tenants"]["acme"]["reviewers"] = {
        name: public_key_text(load_private_key(reviewer_keys[name].read_bytes()).public_key())
        for name in ("alice", "bob")
    }
    path = tmp_path / "governance.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def cli_env(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, cli_config: Path
) -> dict[str, str]:
    """govctl's settings on the (flushed) session Redis: broker and state alike, marked as a
    deployment's state as a worker marks it."""
    write_marker(StateStore(redis_client), "cli-test-worker@host")
    return {
        "GOVERNANCE_BROKER_URL": redis_url,
        "GOVERNANCE_STATE_REDIS_URL": redis_url,
        "GOVERNANCE_CONFIG_PATH": str(cli_config),
        "GOVERNANCE_WORKSPACE_DIR": str(tmp_path / "workspace"),
        "GOVERNANCE_AUDIT_KEY": "cli-test-audit-key",
    }


@pytest.fixture
def govctl(cli_env: dict[str, str]) -> Govctl:
    """Run govctl with ``cli_env`` (plus any ``env=`` overrides): in this process, or as a
    process of its own with ``process=True`` (where timing or the environment is the point)."""

    def run(*args: str, env: dict[str, str] | None = None, process: bool = False) -> Any:
        full = {**cli_env, **(env or {})}
        if process:
            return run_govctl_process(*args, env=full)
        return run_govctl(*args, env=full)

    return run


@pytest.fixture
def state(redis_client: redis.Redis) -> StateStore:
    return StateStore(redis_client)
