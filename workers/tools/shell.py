"""`shell`: runs one program (an argv list, never a shell string) in the workspace, contained.

The child gets a minimal environment (PATH, HOME set to the workspace, LANG), not the worker's,
and the workspace as its working directory. Before the program starts, `sandbox` applies resource
limits (CPU seconds, address space, file size, open files), cuts the network when the kernel
allows it, and, when the worker runs as root, switches to the unprivileged `shell_user`; a
worker that is not root makes itself non-dumpable (`workers.hardening`), so a command running as
its user cannot read its environment or memory.

Every process the command starts ends with the call, and the call's process cap is its own
(`containment`): a cgroup per call (`pids.max`, killed as a whole at the end) or a uid of the
call's own, and a PID namespace whose init ends everything left when the command exits, so a
`setsid` or double-forked grandchild dies too, whether the command exits, times out, floods its
output or the task is interrupted. Where no such containment is available `shell` refuses to
run, unless best effort is on (`GOVERNANCE_SHELL_BEST_EFFORT`). The result says who the command
ran as, whether it had a network, and which containment held (`isolation`). A command stopped by
a limit fails with a permanent `ActionError` naming the limit.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Annotated, Any

from pydantic import Field

from governance.policy.errors import ActionError
from workers.tools import sandbox
from workers.tools.base import InputRejected, ToolEnv, ToolInput, ToolSpec

MAX_OUTPUT_BYTES = 64 * 1024
"""Each of stdout and stderr is cut here; more is read and dropped so the child never blocks, up
to `ShellLimits.output_bytes`, where the command is stopped."""


PIPE_GRACE_S = 5.0
"""How long the output is read after the command ended and everything of it was killed."""


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
    """Reads a pipe to its end, keeping the first `MAX_OUTPUT_BYTES`, counting up to `limit`."""

    def __init__(self, name: str, pipe: IO[bytes], limit: int) -> None:
        super().__init__(daemon=True)
        self.stream = name
        self.pipe = pipe
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.seen = 0
        self.truncated = False

    @property
    def flooded(self) -> bool:
        """More than `limit` bytes came: the command is to be stopped."""
        return self.seen > self.limit

    def run(self) -> None:
        with self.pipe:
            while chunk := os.read(self.pipe.fileno(), 65536):
                self.seen += len(chunk)
                room = MAX_OUTPUT_BYTES - self.kept
                if len(chunk) > room:
                    self.truncated = True
                    chunk = chunk[:room]
                if chunk:
                    self.chunks.append(chunk)
                    self.kept += len(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _wait_unreaped(pid: int, timeout_s: float, stop: Callable[[], bool]) -> str:
    """Wait, without reaping, until `pid` exits ("exited"), `stop()` ("stopped") or timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if stop():
            return "stopped"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)
    return "exited"


def _reap(proc: subprocess.Popen[bytes]) -> float:
    """Reap the command; the CPU seconds it used (for telling the CPU limit's SIGKILL)."""
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped
        proc.wait()
        return 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return float(usage.ru_utime + usage.ru_stime)


def run(inp: ShellInput, env: ToolEnv) -> dict[str, Any]:
    """Run the program contained, in the workspace, and return its exit, output and isolation.

    A non-zero exit is a result, not a failure. A missing or non-executable program, a command
    stopped by a limit (CPU, memory, processes, file size, open files, output) or a containment
    step that failed (or no containment at all) is a permanent failure; exceeding
    `env.shell_timeout_s` is a transient one.
    """
    program = inp.command[0]
    limits = env.shell_limits
    if not env.workspace.is_dir():
        raise ActionError.permanent(f"workspace is not a directory: {env.workspace}")
    launched = sandbox.launch(
        list(inp.command),
        env.workspace,
        _child_env(env),
        env.shell_user,
        limits,
        env.shell_isolate_network,
        env.shell_best_effort,
    )
    proc = launched.proc
    readers: list[_CappedReader] = []
    ended = "interrupted"
    left: str | None = None
    try:
        readers = [
            _CappedReader(name, pipe, limits.output_bytes)
            for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))
            if pipe is not None
        ]
        for reader in readers:
            reader.start()
        ended = _wait_unreaped(
            proc.pid, env.shell_timeout_s, lambda: any(r.flooded for r in readers)
        )
    finally:
        # Also on success (a background grandchild must not outlive the call or hold the
        # pipes), and when interrupted (e.g. Celery's soft time limit): nothing is left running.
        launched.kill()
        cpu_used_s = _reap(proc)
        left = launched.finish()
        for reader in readers:
            reader.join(PIPE_GRACE_S)
        held = [reader.stream for reader in readers if reader.is_alive()]
        if held and left is None:
            # Only in best effort without a PID namespace: a process that left the group.
            left = f"a process that left the call still holds its {' and '.join(held)}"
    if left is not None:
        raise ActionError.permanent(
            f"{program}: not every process of the call could be ended: {left}"
        )
    returncode = proc.returncode
    if ended == "timeout":
        raise ActionError.transient(f"command timed out after {env.shell_timeout_s:g} s: {program}")
    out, err = readers
    for reader in readers:
        if reader.flooded:
            raise ActionError.permanent(
                f"{program} was stopped by the output limit: more than {limits.output_bytes} "
                f"bytes on {reader.stream}"
            )
    limit = sandbox.limit_hit(returncode, cpu_used_s, err.text(), limits, launched.containment.cap)
    if limit is not None:
        raise ActionError.permanent(f"{program} was stopped by {limit}")
    return {
        "returncode": returncode,
        "stdout": out.text(),
        "stderr": err.text(),
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
        "isolation": launched.isolation.as_dict(),
    }


SPEC = ToolSpec(
    name="shell",
    side_effect_class="process.exec",
    input_model=ShellInput,
    run=run,
    check=check,
    description="Run a program (argv list, no shell) in the workspace, contained; returns exit "
    "code, output and how it was isolated.",
)
