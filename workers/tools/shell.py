"""`shell`: runs one program (an argv list, never a shell string) in the workspace.

The child gets a minimal environment (PATH, HOME set to the workspace, LANG), not the worker's,
so provider API keys and other secrets of the worker are not handed to whatever the agent runs.
It starts in its own process group, and when it exits or times out the whole group is killed, so
no background grandchild outlives the call or keeps the worker waiting on the output pipes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import IO, Annotated, Any

from pydantic import Field

from governance.policy.errors import ActionError
from workers.tools.base import InputRejected, ToolEnv, ToolInput, ToolSpec

MAX_OUTPUT_BYTES = 64 * 1024
"""Each of stdout and stderr is cut here; the rest is read and dropped so the child never blocks."""


class ShellInput(ToolInput):
    """The program and its arguments, e.g. ["ls", "-l"]."""

    command: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1)]


def check(inp: ShellInput, env: ToolEnv) -> None:
    """The program name must be non-empty, and no argument may contain a NUL byte."""
    if not inp.command[0]:
        raise InputRejected("command[0] must name a program")
    for index, arg in enumerate(inp.command):
        if "\0" in arg:
            raise InputRejected(f"command[{index}] contains a NUL byte")


def _child_env(env: ToolEnv) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(env.workspace),
        "LANG": "C.UTF-8",
    }


class _CappedReader(threading.Thread):
    """Reads a pipe to its end, keeping only the first `MAX_OUTPUT_BYTES`."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.chunks: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def run(self) -> None:
        with self.pipe:
            while chunk := os.read(self.pipe.fileno(), 65536):
                room = MAX_OUTPUT_BYTES - self.kept
                if len(chunk) > room:
                    self.truncated = True
                    chunk = chunk[:room]
                if chunk:
                    self.chunks.append(chunk)
                    self.kept += len(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit, without reaping it; whether it exited."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)
    return True


def run(inp: ShellInput, env: ToolEnv) -> dict[str, Any]:
    """Run the program with the workspace as working directory and return its exit and output.

    A non-zero exit is a result, not a failure. A missing or non-executable program is a permanent
    failure; exceeding `env.shell_timeout_s` is a transient one.
    """
    program = inp.command[0]
    if not env.workspace.is_dir():
        raise ActionError.permanent(f"workspace is not a directory: {env.workspace}")
    try:
        proc = subprocess.Popen(
            inp.command,
            cwd=env.workspace,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ActionError.permanent(f"no such executable: {program}") from None
    except PermissionError:
        raise ActionError.permanent(f"not executable: {program}") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot run {program}: {exc.strerror or exc}") from exc
    readers = [_CappedReader(pipe) for pipe in (proc.stdout, proc.stderr) if pipe is not None]
    for reader in readers:
        reader.start()
    exited = False
    try:
        exited = _wait_unreaped(proc.pid, env.shell_timeout_s)
    finally:
        # Killed while the child is unreaped (a zombie keeps its pid, so the group id cannot have
        # been reused); also on success, so a background grandchild cannot hold the pipes open,
        # and also when interrupted (e.g. Celery's soft time limit), so nothing is left running.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        for reader in readers:
            reader.join()
    if not exited:
        raise ActionError.transient(f"command timed out after {env.shell_timeout_s:g} s: {program}")
    out, err = readers
    return {
        "returncode": returncode,
        "stdout": out.text(),
        "stderr": err.text(),
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
    }


SPEC = ToolSpec(
    name="shell",
    side_effect_class="process.exec",
    input_model=ShellInput,
    run=run,
    check=check,
    description="Run a program (argv list, no shell) in the workspace; returns exit code, output.",
)
