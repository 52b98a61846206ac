"""A worker or publisher left on the development audit key says so, loudly, as it starts; with
``GOVERNANCE_REQUIRE_SECRETS=1`` it refuses to start instead. Real processes, real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from governance.embedded.processes import stop_processes

ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))
WARNING = "GOVERNANCE_AUDIT_KEY is the DEVELOPMENT DEFAULT"


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNANCE_")}
    env.pop("REDIS_URL", None)
    env.update(
        GOVERNANCE_BROKER_URL=redis_url,
        GOVERNANCE_STATE_REDIS_URL=redis_url,
        GOVERNANCE_CONFIG_PATH=str(ROOT / "config" / "governance.yaml"),
        **extra,
    )
    return env


def _publisher(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A publisher process: it imports the deployment's app, as any caller of submit_* does."""
    return subprocess.run(
        [sys.executable, "-c", "import workers.app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_publisher_on_the_development_key_warns(redis_url: str) -> None:
    started = _publisher(_env(redis_url))
    assert started.returncode == 0, started.stderr
    assert started.stderr.count(WARNING) == 1, started.stderr
    assert "GOVERNANCE_REQUIRE_SECRETS=1 refuses to start" in started.stderr
    quiet = _publisher(_env(redis_url, GOVERNANCE_AUDIT_KEY="a-real-secret"))
    assert quiet.returncode == 0, quiet.stderr
    assert WARNING not in quiet.stderr


def test_require_secrets_refuses_the_development_key(redis_url: str) -> None:
    refused = _publisher(_env(redis_url, GOVERNANCE_REQUIRE_SECRETS="1"))
    assert refused.returncode != 0
    assert "GOVERNANCE_AUDIT_KEY must be set" in refused.stderr


def test_a_worker_on_the_development_key_warns_as_it_starts(redis_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [CELERY, "-A", "workers.app", "worker", "-P", "solo", "--loglevel=INFO",
             "--without-gossip", "--without-mingle", "-n", f"secrets-{os.getpid()}@%h"],
            env=_env(redis_url),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while WARNING not in log_path.read_text(errors="replace"):
                assert worker.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, "no warning:\n" + log_path.read_text()
                time.sleep(0.1)
        finally:
            stop_processes([worker])
