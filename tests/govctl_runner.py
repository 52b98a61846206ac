"""Running ``govctl`` from a test: in this process (output and parsing checks), or as a process
of its own (exit codes and environment, where only a real process shows the truth).

In-process, a run sees exactly what a process would: the environment it is given (the test's
own variables are restored after), no cached settings, policy or app from an earlier run
(``governance.cli.context`` caches them per process, and the deployment's app module reads the
environment when it is imported, so it is imported afresh), its own stdout and stderr, and the
exit code ``main`` ends with. The root logger that ``main`` reconfigures is restored after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from governance.cli import context
from governance.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

#: The caches of ``governance.cli.context``: one process, one deployment.
_CACHED = (context.settings, context.celery_app, context.runtime, context.reviewers)


def _base_env(env: dict[str, str] | None) -> dict[str, str]:
    full = {**os.environ, "COLUMNS": "200", **(env or {})}
    full.pop("REDIS_URL", None)
    return full


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _fresh_deployment(app_spec: str) -> Iterator[None]:
    """No cached settings or app: the app module is imported again (and forgotten after, its
    app closed, so its broker connections do not outlive the run)."""
    module, _, attr = app_spec.partition(":")
    for cached in _CACHED:
        cached.cache_clear()
    sys.modules.pop(module, None)
    try:
        yield
    finally:
        for cached in _CACHED:
            cached.cache_clear()
        imported = sys.modules.pop(module, None)
        app = getattr(imported, attr, None) if imported is not None else None
        if app is not None and hasattr(app, "close"):
            app.close()


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run_govctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``govctl ARGS`` in this process, with ``env`` over the test's environment."""
    full = _base_env(env)
    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    with (
        _environment(full),
        _fresh_deployment(full.get("GOVERNANCE_APP", "workers.app:app")),
        _root_logger_kept(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
    return subprocess.CompletedProcess(["govctl", *args], code, out.getvalue(), err.getvalue())


def govctl_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``govctl ARGS`` started as a process of its own (``python -m governance.cli.main``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "governance.cli.main", *args],
        env=_base_env(env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_govctl_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``govctl ARGS`` as a process of its own, waited for."""
    process = govctl_process(*args, env=env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
