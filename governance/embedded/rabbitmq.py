"""Start and stop a private, real RabbitMQ node on loopback ports, for tests.

Like :class:`~governance.embedded.redis_server.EmbeddedRedis`, the node owns everything it
uses: a temporary directory for its database, logs, configuration and Erlang cookie; free
loopback ports for AMQP and Erlang distribution; and its own ``epmd`` on its own port
(``ERL_EPMD_PORT``), so it never touches a system node, the system epmd or ports 5672/4369.
``stop()`` stops the node, then epmd, and kills whatever is left of the processes it started.

RabbitMQ comes from the system (``apt-get install rabbitmq-server``). The Debian
``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq`` user and the
system paths, so the real script in ``/usr/lib/rabbitmq/bin`` is used instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import amqp

from governance.embedded.processes import StartedByWith
from governance.embedded.redis_server import LOOPBACK, _size, _tail

__all__ = [
    "EmbeddedRabbitMQ",
    "RabbitMQBinaries",
    "RabbitMQBinaryNotFound",
    "RabbitMQStartError",
    "find_rabbitmq_binaries",
]

INSTALL_HINT = (
    "Install RabbitMQ: `apt-get install rabbitmq-server` (Debian/Ubuntu; it brings Erlang), "
    "or set RABBITMQ_SERVER_BIN to a rabbitmq-server script."
)
#: Where distribution packages put the scripts, searched after ``PATH``.
KNOWN_BIN_DIRS: tuple[Path, ...] = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/sbin"))
_DEBIAN_WRAPPER = "rabbitmq-script-wrapper"  # /usr/sbin/rabbitmq-* on Debian: su rabbitmq ...
_GUEST = "guest"
_STARTUP_TIMEOUT_S = 60.0
_GRACEFUL_STOP_S = 30.0  # a node whose data directory is kept
_THROWAWAY_STOP_S = 3.0  # a node whose data directory is removed anyway
_KILL_WAIT_S = 5.0
_POLL_INTERVAL_S = 0.1
_PORT_ATTEMPTS = 3
_PORT_IN_USE_MARKER = "eaddrinuse"
_LOG_FILE = "rabbit.log"
_STDIO_FILE = "rabbitmq.stdio.log"
_STDIO_TAIL_LINES = 80  # a failed boot prints its reason first, then a long crash report
_EPMD_LOG_FILE = "epmd.log"


class RabbitMQBinaryNotFound(RuntimeError):
    """No usable ``rabbitmq-server`` (or the ``epmd`` of its Erlang) could be located."""


class RabbitMQStartError(RuntimeError):
    """A RabbitMQ node could not be started, or did not accept AMQP connections in time."""


@dataclass(frozen=True)
class RabbitMQBinaries:
    """The ``rabbitmq-server`` script, its ``rabbitmqctl``, and Erlang's ``epmd``."""

    server: Path
    ctl: Path
    epmd: Path

    @property
    def plugins_dir(self) -> Path | None:
        """The installation's plugins directory (``$RABBITMQ_HOME/plugins``), if found."""
        folder = self.server.resolve().parent.parent / "plugins"
        return folder if folder.is_dir() else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _usable_server(candidate: Path) -> Path | None:
    """``candidate`` itself, or the real script behind a Debian ``su rabbitmq`` wrapper."""
    if not _executable(candidate):
        return None
    if candidate.resolve().name != _DEBIAN_WRAPPER:
        return candidate
    real = candidate.resolve().parent / "rabbitmq-server"
    return real if _executable(real) and real.resolve().name != _DEBIAN_WRAPPER else None


def _find_epmd() -> Path | None:
    found = shutil.which("epmd")
    if found:
        return Path(found)
    erl = shutil.which("erl")
    roots = [Path("/usr/lib/erlang"), Path("/usr/local/lib/erlang")]
    if erl:
        roots.insert(0, Path(erl).resolve().parent.parent)
    for root in roots:
        for candidate in (root / "bin" / "epmd", *sorted(root.glob("erts-*/bin/epmd"))):
            if _executable(candidate):
                return candidate
    return None


def find_rabbitmq_binaries() -> RabbitMQBinaries:
    """Locate ``rabbitmq-server``, the ``rabbitmqctl`` beside it, and ``epmd``.

    Order: the ``RABBITMQ_SERVER_BIN`` environment variable, then ``PATH``, then
    :data:`KNOWN_BIN_DIRS`. Raises :class:`RabbitMQBinaryNotFound`, saying how to install.
    """
    override = os.environ.get("RABBITMQ_SERVER_BIN")
    if override:
        server = _usable_server(Path(override))
        if server is None:
            raise RabbitMQBinaryNotFound(
                f"RABBITMQ_SERVER_BIN={override!r} is not an executable rabbitmq-server script; "
                "point it at one or unset it."
            )
    else:
        on_path = shutil.which("rabbitmq-server")
        candidates = [Path(on_path)] if on_path else []
        candidates += [folder / "rabbitmq-server" for folder in KNOWN_BIN_DIRS]
        usable = (_usable_server(candidate) for candidate in candidates)
        found = next((server for server in usable if server is not None), None)
        if found is None:
            looked_in = ", ".join(["PATH", *(str(folder) for folder in KNOWN_BIN_DIRS)])
            raise RabbitMQBinaryNotFound(
                f"No rabbitmq-server found (looked in RABBITMQ_SERVER_BIN (unset), {looked_in}). "
                + INSTALL_HINT
            )
        server = found
    ctl = server.parent / "rabbitmqctl"
    if not _executable(ctl):
        raise RabbitMQBinaryNotFound(f"Found {server} but no rabbitmqctl beside it. {INSTALL_HINT}")
    epmd = _find_epmd()
    if epmd is None:
        raise RabbitMQBinaryNotFound(
            f"Found {server} but not Erlang's epmd (on PATH or under /usr/lib/erlang). "
            + INSTALL_HINT
        )
    return RabbitMQBinaries(server=server, ctl=ctl, epmd=epmd)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts_connections(port: int, timeout_s: float = 0.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _process_table() -> dict[int, tuple[int, int, int]]:
    """Live (non-zombie) processes: pid -> (parent pid, session id, start time). Linux only."""
    table: dict[int, tuple[int, int, int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesised command: state ppid pgrp session ... starttime (field 22).
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 19 and fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def _tracked_processes(roots: set[int]) -> dict[int, int]:
    """``roots``, their descendants and their sessions' members: pid -> start time.

    The Erlang VM's port helpers (``erl_child_setup`` and what it runs) start sessions of
    their own, so the process tree is followed as well as the sessions.
    """
    table = _process_table()
    found = {pid for pid, (_, sid, _) in table.items() if pid in roots or sid in roots}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return {pid: table[pid][2] for pid in found}


def _alive(tracked: Mapping[int, int]) -> list[int]:
    """The processes of ``tracked`` still alive (same pid and start time, not a zombie)."""
    table = _process_table()
    return [pid for pid, started in tracked.items() if pid in table and table[pid][2] == started]


def _kill_leftovers(tracked: Mapping[int, int], wait_s: float = 0.0) -> None:
    """SIGKILL every process of ``tracked`` still alive; wait up to ``wait_s`` for them to go."""
    for pid in _alive(tracked):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while _alive(tracked) and time.monotonic() < deadline:
        time.sleep(0.02)


def _app_dependencies(app_dir: Path) -> list[str]:
    """The ``applications`` an OTP application directory declares in ``ebin/<name>.app``."""
    found: list[str] = []
    for app_file in app_dir.glob("ebin/*.app"):
        text = app_file.read_text(errors="replace")
        match = re.search(r"\{\s*applications\s*,\s*\[([^\]]*)\]", text)
        if match:
            found += [name.strip() for name in match.group(1).split(",") if name.strip()]
    return found


def _trimmed_plugins_dir(plugins_dir: Path, target: Path, wanted: Sequence[str]) -> Path:
    """A plugins directory of links: libraries and the core, plus ``wanted`` plugins only.

    RabbitMQ scans every application of its plugins directory at boot (boot steps, feature
    flags, configuration schemas); leaving out the optional ``rabbitmq_*`` plugins nobody
    enables saves about a second of every start. Dependencies come from the ``.app`` files.
    """
    apps: dict[str, Path] = {}
    for entry in plugins_dir.iterdir():
        match = re.match(r"(.+?)-\d", entry.name.removesuffix(".ez"))
        if match:
            apps[match.group(1)] = entry
    pending = [name for name in apps if not name.startswith("rabbitmq_")]
    pending += ["rabbitmq_prelaunch", *wanted]
    keep: set[str] = set()
    while pending:
        name = pending.pop()
        if name in apps and name not in keep:
            keep.add(name)
            pending += _app_dependencies(apps[name])
    target.mkdir(exist_ok=True)
    for name in sorted(keep):
        link = target / apps[name].name
        if not link.exists():
            link.symlink_to(apps[name])
    return target


def _close_quietly(connection: amqp.Connection) -> None:
    """Close a readiness-check connection: politely if the handshake finished, else the socket."""
    with contextlib.suppress(Exception):
        if connection.connected:
            connection.close()
    with contextlib.suppress(Exception):
        connection.collect()


_LIVE: set[EmbeddedRabbitMQ] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_live() -> None:
    """``atexit`` hook: no node started here outlives the Python process that started it."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for node in live:
        with contextlib.suppress(Exception):
            node.stop()


atexit.register(_stop_all_live)


class EmbeddedRabbitMQ(StartedByWith):
    """One private RabbitMQ node listening on 127.0.0.1 only, owned by this object.

    ``start()`` launches epmd and the node and waits until the node accepts an AMQP login as
    ``guest``; ``stop()`` stops both and leaves no process behind. The directory holding the
    configuration, database and logs is temporary (removed by ``stop()``) unless ``data_dir``
    is given (then it is kept).

    ``consumer_timeout_ms`` sets RabbitMQ's ``consumer_timeout`` (default 30 minutes). The
    server checks it only every ``channel_tick_interval`` (default 60 s), so that interval is
    shortened with it (a fifth of the timeout, 100 ms to 1 s) unless given explicitly.
    ``config`` adds ``rabbitmq.conf`` settings; ``advanced`` adds ``rabbit`` application
    settings to ``advanced.config``, values written as Erlang terms (an int, or the term's
    text, e.g. ``"<<\\"quorum\\">>"``). ``plugins`` are enabled at boot; when
    ``rabbitmq_management`` is one of them its HTTP API listens on :attr:`management_port`.
    ``trim_plugins`` hides the optional plugins nobody enabled from the node, which makes
    it boot about a second faster.

    ``stop()`` sends SIGTERM (a clean shutdown) and waits ``stop_timeout_s`` before killing:
    by default 30 s when ``data_dir`` is kept, 3 s for a temporary one (whose data is deleted
    anyway; a plain node stops in about a second, one with the management plugin in six).
    """

    def __init__(
        self,
        *,
        consumer_timeout_ms: int | None = None,
        channel_tick_interval_ms: int | None = None,
        config: Mapping[str, str | int] | None = None,
        advanced: Mapping[str, str | int] | None = None,
        plugins: Sequence[str] = (),
        trim_plugins: bool = True,
        data_dir: Path | None = None,
        startup_timeout_s: float = _STARTUP_TIMEOUT_S,
        stop_timeout_s: float | None = None,
    ) -> None:
        if consumer_timeout_ms is not None and consumer_timeout_ms < 1:
            raise ValueError("consumer_timeout_ms must be positive")
        if channel_tick_interval_ms is None and consumer_timeout_ms is not None:
            channel_tick_interval_ms = max(100, min(1000, consumer_timeout_ms // 5))
        self._consumer_timeout_ms = consumer_timeout_ms
        self._channel_tick_interval_ms = channel_tick_interval_ms
        self._config = dict(config or {})
        self._advanced = dict(advanced or {})
        self._plugins = tuple(plugins)
        self._trim_plugins = trim_plugins
        self._requested_data_dir = Path(data_dir) if data_dir is not None else None
        self._startup_timeout_s = startup_timeout_s
        if stop_timeout_s is None:
            stop_timeout_s = _GRACEFUL_STOP_S if data_dir is not None else _THROWAWAY_STOP_S
        self._stop_timeout_s = stop_timeout_s
        self._node_name = f"governance-{os.getpid()}-{secrets.token_hex(4)}@localhost"
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._ports: tuple[int, ...] | None = None  # amqp, distribution, epmd, management
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._binaries: RabbitMQBinaries | None = None
        self._startup_s: float | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- properties

    @property
    def binaries(self) -> RabbitMQBinaries:
        if self._binaries is None:
            self._binaries = find_rabbitmq_binaries()
        return self._binaries

    @property
    def node_name(self) -> str:
        """The Erlang node name, unique per instance (``governance-<pid>-<hex>@localhost``)."""
        return self._node_name

    def _port(self, index: int) -> int:
        if self._ports is None:
            raise RuntimeError("EmbeddedRabbitMQ has not been started")
        return self._ports[index]

    @property
    def port(self) -> int:
        """The AMQP port (the last one used, after ``stop()``)."""
        return self._port(0)

    @property
    def dist_port(self) -> int:
        """The Erlang distribution port (what ``rabbitmqctl`` connects to)."""
        return self._port(1)

    @property
    def epmd_port(self) -> int:
        """The port of this node's own epmd (``ERL_EPMD_PORT``)."""
        return self._port(2)

    @property
    def management_port(self) -> int:
        """The management plugin's HTTP port (only with ``plugins=["rabbitmq_management"]``)."""
        if not self._has_management:
            raise RuntimeError("the rabbitmq_management plugin is not enabled on this node")
        return self._port(3)

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT//`` (the default vhost ``/``)."""
        return f"amqp://{_GUEST}:{_GUEST}@{LOOPBACK}:{self.port}//"

    def vhost(self, name: str) -> str:
        """Create the virtual host ``name`` (``guest`` may use it) and return its AMQP URL: a
        broker of its own on the same node (queues and exchanges are per vhost)."""
        self.rabbitmqctl("add_vhost", name)
        self.rabbitmqctl("set_permissions", "-p", name, _GUEST, ".*", ".*", ".*")
        return f"amqp://{_GUEST}:{_GUEST}@{LOOPBACK}:{self.port}/{name}"

    @property
    def management_url(self) -> str:
        """``http://guest:guest@127.0.0.1:PORT/api/`` (what Flower's ``--broker-api`` takes)."""
        return f"http://{_GUEST}:{_GUEST}@{LOOPBACK}:{self.management_port}/api/"

    @property
    def consumer_timeout_ms(self) -> int | None:
        return self._consumer_timeout_ms

    @property
    def data_dir(self) -> Path:
        if self._data_dir is not None:
            return self._data_dir
        if self._requested_data_dir is not None:
            return self._requested_data_dir
        raise RuntimeError("EmbeddedRabbitMQ has not been started")

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / _LOG_FILE

    @property
    def pid(self) -> int | None:
        """The process id of the ``rabbitmq-server`` script while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def startup_s(self) -> float | None:
        """Seconds the last ``start()`` took until the node accepted an AMQP login."""
        return self._startup_s

    def process_ids(self) -> set[int]:
        """Every live process this node started: the script, the VM and its helpers, epmd."""
        return set(self._tracked())

    @property
    def _has_management(self) -> bool:
        return "rabbitmq_management" in self._plugins

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Launch epmd and the node; wait until it accepts AMQP logins. No-op if running."""
        with self._lock:
            if self.is_running:
                return self
            binaries = self.binaries  # RabbitMQBinaryNotFound before anything is created
            began = time.monotonic()
            data_dir = self._ensure_data_dir()
            try:
                for attempt in range(1, _PORT_ATTEMPTS + 1):
                    self._ports = tuple(_free_ports(4 if self._has_management else 3))
                    try:
                        self._launch(binaries, data_dir, began)
                        break
                    except RabbitMQStartError as exc:
                        self._stop_processes(graceful=False)
                        if _PORT_IN_USE_MARKER not in str(exc) or attempt == _PORT_ATTEMPTS:
                            raise
            except BaseException:
                self._stop_processes(graceful=False)
                self._release_data_dir()
                raise
            self._startup_s = time.monotonic() - began
            return self

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL after ``stop_timeout_s``), then epmd; kill
        leftovers. Idempotent."""
        with self._lock:
            self._stop_processes(graceful=True)
            self._release_data_dir()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        port = self._ports[0] if self._ports else None
        return f"<EmbeddedRabbitMQ {self._node_name} port={port} {state}>"

    # ------------------------------------------------------------------ control

    def rabbitmqctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <this node> ARGS``; its output, or RuntimeError if it fails."""
        if not self.is_running:
            raise RuntimeError("EmbeddedRabbitMQ is not running")
        command = [str(self.binaries.ctl), "-n", self._node_name, *args]
        result = subprocess.run(
            command,
            env=self._env(self.data_dir),
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed (exit code {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout.strip()

    def eval(self, expression: str) -> str:
        """Evaluate an Erlang expression on the node and return what it printed.

        ``node.eval("application:get_env(rabbit, consumer_timeout).")`` returns ``{ok,5000}``.
        """
        return self.rabbitmqctl("eval", expression)

    # ------------------------------------------------------------------ internals

    def _ensure_data_dir(self) -> Path:
        if self._data_dir is None:
            if self._requested_data_dir is not None:
                self._requested_data_dir.mkdir(parents=True, exist_ok=True)
                self._data_dir = self._requested_data_dir.resolve()
                self._owns_data_dir = False
            else:
                self._data_dir = Path(tempfile.mkdtemp(prefix="embedded-rabbitmq-")).resolve()
                self._owns_data_dir = True
        return self._data_dir

    def _release_data_dir(self) -> None:
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._owns_data_dir = False
        self._data_dir = None

    def _env(self, data_dir: Path) -> dict[str, str]:
        """The environment of the node and of ``rabbitmqctl``: every path in ``data_dir``."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_EPMD_"))
        }
        env.update(
            HOME=str(data_dir),  # the Erlang cookie is created and read there
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=LOOPBACK,
            RABBITMQ_NODENAME=self._node_name,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(data_dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(data_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(data_dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(data_dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(data_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(data_dir / "log"),
            RABBITMQ_LOGS=str(data_dir / "log" / _LOG_FILE),
            RABBITMQ_PID_FILE=str(data_dir / "rabbitmq.pid"),
            # epmd is ours (started first), and distribution listens on loopback only.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        )
        if (data_dir / "plugins").is_dir():
            env["RABBITMQ_PLUGINS_DIR"] = str(data_dir / "plugins")
        return env

    def _write_config(self, binaries: RabbitMQBinaries, data_dir: Path) -> None:
        conf: dict[str, str | int] = {
            "listeners.tcp.1": f"{LOOPBACK}:{self.port}",
            "cluster_name": self._node_name,  # lets start() check the node answering is ours
            "log.console": "false",
            "log.file.level": "info",
        }
        if self._consumer_timeout_ms is not None:
            conf["consumer_timeout"] = self._consumer_timeout_ms
        if self._has_management:
            conf["management.tcp.ip"] = LOOPBACK
            conf["management.tcp.port"] = self.management_port
        conf.update(self._config)
        (data_dir / "rabbitmq.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in conf.items())
        )
        advanced: dict[str, str | int] = {}
        if self._channel_tick_interval_ms is not None:
            advanced["channel_tick_interval"] = self._channel_tick_interval_ms
        advanced.update(self._advanced)
        terms = ", ".join(f"{{{key}, {value}}}" for key, value in advanced.items())
        (data_dir / "advanced.config").write_text(f"[{{rabbit, [{terms}]}}].\n")
        (data_dir / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")
        (data_dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        if self._trim_plugins and binaries.plugins_dir is not None:
            _trimmed_plugins_dir(binaries.plugins_dir, data_dir / "plugins", self._plugins)
        (data_dir / "log").mkdir(exist_ok=True)

    def _launch(self, binaries: RabbitMQBinaries, data_dir: Path, began: float) -> None:
        self._write_config(binaries, data_dir)
        env = self._env(data_dir)
        deadline = began + self._startup_timeout_s
        offsets = (_size(self.log_file), _size(data_dir / _STDIO_FILE))
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._epmd = self._spawn(
            [str(binaries.epmd), "-port", str(self.epmd_port), "-address", LOOPBACK],
            env,
            data_dir / _EPMD_LOG_FILE,
        )
        while not _accepts_connections(self.epmd_port):
            code = self._epmd.poll()
            if code is not None or time.monotonic() >= deadline:
                raise self._failure(
                    f"epmd did not listen on port {self.epmd_port} (exit code {code}):\n"
                    + _tail(data_dir / _EPMD_LOG_FILE),
                    offsets,
                )
            time.sleep(_POLL_INTERVAL_S / 5)
        self._proc = self._spawn([str(binaries.server)], env, data_dir / _STDIO_FILE)
        self._wait_ready(self._proc, deadline, offsets)

    def _spawn(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        stdio: IO[bytes]
        with log.open("ab") as stdio:
            try:
                return subprocess.Popen(
                    command,
                    env=env,
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=stdio,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C meant for the tests does not reach it
                )
            except OSError as exc:
                raise RabbitMQStartError(f"could not execute {command[0]}: {exc}") from exc

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], deadline: float, offsets: tuple[int, int]
    ) -> None:
        last_error = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise self._failure(
                    f"RabbitMQ node {self._node_name} exited with code {code} during startup",
                    offsets,
                )
            if _accepts_connections(self.port):
                connection = amqp.Connection(
                    host=f"{LOOPBACK}:{self.port}",
                    userid=_GUEST,
                    password=_GUEST,
                    virtual_host="/",
                    connect_timeout=2,
                )
                try:
                    connection.connect()
                    name = connection.server_properties.get("cluster_name")
                    if name == self._node_name:
                        return
                    last_error = f"port {self.port} answered by another node ({name!r})"
                except Exception as exc:  # amqp raises many kinds while the node boots
                    last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    _close_quietly(connection)
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL_S)
        raise self._failure(
            f"RabbitMQ node {self._node_name} did not accept an AMQP login on port "
            f"{self.port} within {self._startup_timeout_s:.1f}s (last error: {last_error})",
            offsets,
        )

    def _failure(self, reason: str, offsets: tuple[int, int]) -> RabbitMQStartError:
        data_dir = self.data_dir
        parts = [reason]
        stdio_tail = _tail(data_dir / _STDIO_FILE, since=offsets[1], lines=_STDIO_TAIL_LINES)
        log_tail = _tail(self.log_file, since=offsets[0])
        if stdio_tail:
            parts.append(f"--- rabbitmq-server output ---\n{stdio_tail}")
        if log_tail:
            parts.append(f"--- tail of {self.log_file} ---\n{log_tail}")
        if not stdio_tail and not log_tail:
            parts.append("(rabbitmq-server wrote no log output)")
        return RabbitMQStartError("\n".join(parts))

    def _tracked(self) -> dict[int, int]:
        roots = {child.pid for child in (self._proc, self._epmd) if child is not None}
        return _tracked_processes(roots) if roots else {}

    def _stop_processes(self, *, graceful: bool) -> None:
        proc, epmd = self._proc, self._epmd
        tracked = self._tracked()  # before anything exits and its helpers are re-parented
        try:
            if proc is not None and proc.poll() is None:
                # The script traps SIGTERM and stops the VM cleanly, waiting for it.
                proc.terminate()
                try:
                    proc.wait(timeout=self._stop_timeout_s if graceful else _KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    _kill_leftovers(tracked)
            if epmd is not None and epmd.poll() is None:
                epmd.terminate()
                try:
                    epmd.wait(timeout=_KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    epmd.kill()
        finally:
            # Whatever happened above: no VM, helper or epmd outlives stop(), and no zombie.
            _kill_leftovers(tracked, wait_s=_KILL_WAIT_S)
            for child in (proc, epmd):
                if child is not None:
                    if child.poll() is None:
                        child.kill()
                    child.wait()
            self._proc = self._epmd = None
            # The distribution port went on accepting connections for a moment after every
            # tracked process had exited (about one stop in two here): stop() returns once the
            # node's ports are free, so a caller (or the next node) finds them closed.
            deadline = time.monotonic() + _KILL_WAIT_S
            while any(_accepts_connections(p) for p in self._ports or ()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            with _LIVE_LOCK:
                _LIVE.discard(self)
