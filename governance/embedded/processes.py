"""Stopping the service processes we start (workers, Flower): politely first, then for sure.

A Celery worker given SIGTERM finishes its running tasks (warm shutdown); one that does not exit
in time is killed, with its whole process group when it leads one, so no pool child is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float = 20) -> None:
    """SIGTERM every process still running, wait up to ``timeout_s``, then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                if os.getpgid(process.pid) == process.pid:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def log_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a process log, for error messages."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class StartedByWith:
    """``with server:`` starts it and stops it on the way out, whatever happened inside: the
    embedded servers define ``start`` (returning the server) and ``stop``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
