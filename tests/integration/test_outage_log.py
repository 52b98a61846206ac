"""What an outage of the state store logs: once when it starts, then at most every 30 s, and
once when it ends; never a warning per thread per round (the maintenance thread used to say it
twice a second, the notifier once a second)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governance.embedded import EmbeddedRedis
from governance.integration import store_health
from governance.integration.store_health import OutageLog, StoreHealth
from governance.store.errors import StoreUnavailable
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("governance.maintenance", logging.WARNING, "x", 1, message, args, None)


def _down() -> StoreUnavailable:
    return StoreUnavailable("maintenance lock", ConnectionError("Connection refused"))


def test_the_first_warning_passes_then_one_every_30_s_saying_how_many_were_left_out(
    clock: Clock,
) -> None:
    log = OutageLog(clock=clock)
    passed = []
    for _ in range(130):  # two a second for 65 s
        record = _record("maintenance skipped a round: %s", _down())
        if log.filter(record):
            passed.append(record.getMessage())
        clock.now += 0.5
    assert len(passed) == 3, passed
    assert passed[0] == (
        "maintenance skipped a round: governance state store unavailable during maintenance "
        "lock: Connection refused"
    )
    assert passed[1].endswith(
        "(the state store has not answered for 30 s; 59 similar message(s) since the last one "
        "were not logged)"
    )
    # Anything else is never held back, outage or not.
    assert log.filter(_record("policy reloaded: version %s", "abc"))
    assert log.ended() == (pytest.approx(65.0), 127)
    assert log.ended() is None
    assert log.filter(_record("maintenance skipped a round: %s", _down()))  # a new outage


def test_the_store_answering_again_is_logged_once(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = OutageLog(clock=clock)
    monkeypatch.setattr(store_health, "OUTAGE_LOG", log)
    health = StoreHealth(lease_s=30, heartbeat_s=10)
    with caplog.at_level(logging.WARNING, logger="governance"):
        health.answered()
        assert not caplog.records  # no outage, nothing to say
        for _ in range(10):
            with pytest.raises(StoreUnavailable), health.call():
                raise _down()
            log.filter(_record("notifications skipped a round: %s", _down()))
            clock.now += 1
        health.answered()
        health.answered()
    (back,) = [r.getMessage() for r in caplog.records]
    assert back == (
        "the state store answers again, after an outage of 10 s (9 repeated warning(s) about it "
        "were not logged)"
    )


@pytest.fixture
def state_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_worker_logs_an_outage_once_and_its_end_once(
    redis_url: str, state_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """A real worker whose state Redis stops for a few seconds, then comes back."""
    log_path = tmp_path / "worker.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GOVERNANCE_")},
        "GOVERNANCE_BROKER_URL": redis_url,
        "GOVERNANCE_STATE_REDIS_URL": state_redis.url,
        "GOVERNANCE_CONFIG_PATH": str(ROOT / "config" / "governance.yaml"),
        "GOVERNANCE_AUDIT_KEY": "outage-log-test",
        "GOVERNANCE_WORKSPACE_DIR": str(tmp_path / "workspace"),
        "GOVERNANCE_STATE_TIMEOUT_S": "0.3",
        "GOVERNANCE_LEASE_MS": "3000",
    }
    env.pop("REDIS_URL", None)
    with log_path.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-c", "1",
             "--loglevel=INFO", "-Q", "outage-log-test", "-n", f"outage-{os.getpid()}@%h"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: b"ready." in log_path.read_bytes(), 60, "the worker to start")
            state_redis.halt()
            wait_until(
                lambda: b"skipped a round" in log_path.read_bytes(), 20, "the outage to be logged"
            )
            # Six seconds of outage: twelve maintenance rounds, six notifier rounds.
            time.sleep(6)
            state_redis.restart()
            wait_until(
                lambda: b"answers again" in log_path.read_bytes(),
                30,
                "the end of the outage to be logged",
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    lines = log_path.read_text(errors="replace").splitlines()
    about = [line for line in lines if "WARNING" in line or "ERROR" in line]
    outage = [line for line in about if "unavailable" in line or "answers again" in line]
    assert len(outage) == 2, "\n".join(about)
    assert "answers again" in outage[1]
