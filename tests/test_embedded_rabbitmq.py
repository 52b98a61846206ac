"""The embedded RabbitMQ node: a real broker for a real Celery worker, stopped without a trace.

The tests that start a node skip where RabbitMQ is not installed (``apt-get install
rabbitmq-server``), and fail instead when ``GOVERNANCE_REQUIRE_RABBITMQ=1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import amqp
import httpx
import pytest
from celery import Celery

import governance.embedded.rabbitmq as rabbitmq_module
from governance.embedded import (
    EmbeddedRabbitMQ,
    RabbitMQBinaryNotFound,
    RabbitMQStartError,
    find_rabbitmq_binaries,
)
from governance.embedded.processes import log_tail, stop_processes
from tests.celery_smoke_app import BACKEND_ENV, BROKER_ENV, create_app
from tests.conftest import (
    REQUIRE_RABBITMQ_ENV,
    SHORT_CONSUMER_TIMEOUT_MS,
    rabbitmq_binaries_or_skip,
    start_rabbitmq,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies waiting for a reaper do not count)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.fixture
def no_rabbitmq(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A machine without RabbitMQ: nothing on PATH, nothing in the usual folders."""
    monkeypatch.delenv("RABBITMQ_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(rabbitmq_module, "KNOWN_BIN_DIRS", (tmp_path,))


# --------------------------------------------------------------------- no RabbitMQ


@pytest.mark.usefixtures("no_rabbitmq")
def test_missing_rabbitmq_says_how_to_install_it() -> None:
    with pytest.raises(RabbitMQBinaryNotFound, match=r"apt-get install rabbitmq-server"):
        find_rabbitmq_binaries()
    node = EmbeddedRabbitMQ()
    with pytest.raises(RabbitMQBinaryNotFound):
        node.start()
    assert not node.is_running


@pytest.mark.usefixtures("no_rabbitmq")
def test_fixture_skips_without_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_RABBITMQ_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install rabbitmq-server"):
        start_rabbitmq()


@pytest.mark.usefixtures("no_rabbitmq")
def test_fixture_fails_without_rabbitmq_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_RABBITMQ_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=rf"{REQUIRE_RABBITMQ_ENV}=1.*apt-get install"):
        start_rabbitmq()


def test_debian_wrapper_is_replaced_by_the_real_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """/usr/sbin/rabbitmq-server on Debian runs the server as user rabbitmq with system paths."""
    lib_bin, sbin = tmp_path / "lib" / "bin", tmp_path / "sbin"
    lib_bin.mkdir(parents=True)
    sbin.mkdir()
    for name in ("rabbitmq-script-wrapper", "rabbitmq-server", "rabbitmqctl"):
        (lib_bin / name).write_text("#!/bin/sh\n")
        (lib_bin / name).chmod(0o755)
    (sbin / "rabbitmq-server").symlink_to(lib_bin / "rabbitmq-script-wrapper")
    monkeypatch.delenv("RABBITMQ_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", f"{sbin}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        binaries = find_rabbitmq_binaries()
    except RabbitMQBinaryNotFound as exc:  # no epmd: Erlang is not installed here
        pytest.skip(f"Erlang's epmd is not installed: {exc}")
    assert binaries.server == lib_bin / "rabbitmq-server"
    assert binaries.ctl == lib_bin / "rabbitmqctl"


# ------------------------------------------------------------------ a real node


@pytest.fixture
def smoke_app(rabbitmq_url: str, redis_url: str) -> Celery:
    return create_app(rabbitmq_url, redis_url)


@pytest.fixture
def smoke_worker(
    smoke_app: Celery, rabbitmq_url: str, redis_url: str, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A real prefork `celery worker` of ``tests.celery_smoke_app`` on the RabbitMQ broker."""
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        BROKER_ENV: rabbitmq_url,
        BACKEND_ENV: redis_url,
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [
                CELERY,
                "-A",
                "tests.celery_smoke_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"smoke-{os.getpid()}@%h",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not smoke_app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker did not answer a ping:\n{log_tail(log_path)}")
        yield worker
    finally:
        stop_processes([worker])
        smoke_app.close()


def test_a_celery_worker_runs_tasks_through_the_node(
    smoke_app: Celery, smoke_worker: subprocess.Popen[bytes]
) -> None:
    assert smoke_app.connection_for_write().transport.driver_type == "amqp"
    assert smoke_app.send_task("smoke.add", (2, 3)).get(timeout=30) == 5
    info = smoke_app.send_task("smoke.delivery_info").get(timeout=30)
    assert info == {"exchange": "", "routing_key": "celery", "redelivered": False}


def test_the_session_node_is_private(rabbitmq: EmbeddedRabbitMQ) -> None:
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}//"
    assert rabbitmq.port != 5672
    assert rabbitmq.epmd_port != 4369
    assert rabbitmq.eval("node().") == f"'{rabbitmq.node_name}'"
    assert rabbitmq.eval('os:getenv("ERL_EPMD_PORT").') == f'"{rabbitmq.epmd_port}"'
    assert str(rabbitmq.data_dir) in rabbitmq.eval("rabbit_mnesia:dir().")


def test_consumer_timeout_closes_the_channel_of_an_unacked_delivery(
    rabbitmq_short_consumer_timeout: EmbeddedRabbitMQ,
) -> None:
    node = rabbitmq_short_consumer_timeout
    assert node.eval("application:get_env(rabbit, consumer_timeout).") == (
        f"{{ok,{SHORT_CONSUMER_TIMEOUT_MS}}}"
    )
    queue = "consumer-timeout-test"
    connection = amqp.Connection(host=f"127.0.0.1:{node.port}", connect_timeout=5)
    connection.connect()
    try:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=False)
        channel.basic_publish(amqp.Message("held too long"), routing_key=queue)
        received: list[amqp.Message] = []
        channel.basic_consume(queue, callback=received.append, no_ack=False)
        connection.drain_events(timeout=10)
        assert len(received) == 1
        delivered_at = time.monotonic()
        deadline = delivered_at + SHORT_CONSUMER_TIMEOUT_MS / 1000 + 15
        with pytest.raises(amqp.PreconditionFailed, match="timed out") as closed:  # noqa: PT012
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=1)
        waited = time.monotonic() - delivered_at
        assert waited >= SHORT_CONSUMER_TIMEOUT_MS / 1000 - 0.5, closed.value
        # The unacknowledged message went back to the queue, flagged as redelivered.
        again = connection.channel().basic_get(queue, no_ack=True)
        assert again is not None
        assert again.body == "held too long"
        assert again.delivery_info["redelivered"] is True
    finally:
        connection.close()


@pytest.mark.slow
def test_stop_leaves_no_process_port_or_directory() -> None:
    """With the management plugin, so its HTTP port is checked too (and the plugin works)."""
    node = start_rabbitmq(plugins=["rabbitmq_management"])
    try:
        pids = node.process_ids()
        ports = (node.port, node.dist_port, node.epmd_port, node.management_port)
        data_dir = node.data_dir
        assert node.pid in pids
        assert len(pids) >= 3, pids  # epmd, the script, the Erlang VM (and its helpers)
        assert all(_accepts_connections(port) for port in ports)
        assert node.startup_s is not None
        overview = httpx.get(
            f"http://127.0.0.1:{node.management_port}/api/overview",
            auth=("guest", "guest"),
            timeout=10,
        )
        assert overview.json()["cluster_name"] == node.node_name
    finally:
        node.stop()
    assert not node.is_running
    assert node.pid is None
    assert not _alive(pids), f"left behind: {_alive(pids)}"
    assert not any(_accepts_connections(port) for port in ports)
    assert not data_dir.exists()
    node.stop()  # idempotent


@pytest.mark.slow
def test_a_node_that_cannot_start_reports_its_log() -> None:
    rabbitmq_binaries_or_skip()
    node = EmbeddedRabbitMQ(config={"no_such_setting": "1"})
    with pytest.raises(RabbitMQStartError, match="exited with code") as failure:
        node.start()
    assert "no_such_setting" in str(failure.value)  # RabbitMQ's own complaint, from its log
    assert not node.is_running
