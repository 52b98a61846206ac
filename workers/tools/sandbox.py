"""How `shell` starts a command contained, and how it tells which limit stopped one.

`launch` starts `sandbox_child.py` with a clean environment in the workspace; the launcher sets
the resource limits, isolates the network when the kernel allows it, and, when the worker runs as
root, becomes the unprivileged `shell_user` before it execs the command. What it could and could
not do comes back as an `Isolation`, which the result carries and the log warns about.

What this does not do (see the README): it is not a container. A command running as the worker's
own user (a worker that is not root) can read every file that user can read and signal its
processes; only their memory and environment are closed to it (`workers.hardening`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from governance.policy.errors import ActionError

__all__ = ["Isolation", "ShellLimits", "launch", "limit_hit"]

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class ShellLimits:
    """What one `shell` command may use. `processes` counts beyond what its user already runs."""

    cpu_s: int = 10
    memory_bytes: int = 1024 * 1024 * 1024
    processes: int = 64
    file_size_bytes: int = 64 * 1024 * 1024
    open_files: int = 256
    output_bytes: int = 1024 * 1024
    """Output read per stream before the command is stopped (only 64 KiB of it are kept)."""


@dataclass(frozen=True)
class Isolation:
    """Who the command ran as, and its network: "none", or "shared: <why not isolated>"."""

    user: str
    network: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class _Target:
    uid: int | None
    gid: int | None
    user: str


def _target(shell_user: str | None, workspace: Path) -> _Target:
    """Who the command runs as: `shell_user` when the worker is root, else the worker's user."""
    if os.geteuid() != 0:
        uid = os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return _Target(None, None, f"{name} (uid {uid}, the worker's own user)")
    if not shell_user:
        raise ActionError.permanent(
            "the worker runs as root and no shell_user is configured: refusing to run commands "
            "as root (set GOVERNANCE_SHELL_USER to an unprivileged user)"
        )
    try:
        entry = pwd.getpwnam(shell_user)
    except KeyError:
        raise ActionError.permanent(
            f"shell_user {shell_user!r} does not exist: refusing to run commands as root"
        ) from None
    if entry.pw_uid == 0:
        raise ActionError.permanent(f"shell_user {shell_user!r} is root: it must be unprivileged")
    # The user gets the workspace directory (only the directory: chown-ing what is inside would
    # follow links an earlier command planted). Files written there by the file tools, as root,
    # stay readable to it, and replaceable since it owns the directory.
    if workspace.stat().st_uid != entry.pw_uid:
        os.chown(workspace, entry.pw_uid, entry.pw_gid)
    return _Target(entry.pw_uid, entry.pw_gid, f"{shell_user} (uid {entry.pw_uid})")


def _exec_failure(program: str, errno_value: int, message: str) -> ActionError:
    if errno_value == errno.ENOENT:
        return ActionError.permanent(f"no such executable: {program}")
    if errno_value == errno.EACCES:
        return ActionError.permanent(f"not executable: {program}")
    return ActionError.permanent(f"cannot run {program}: {message}")


def _read_status(fd: int) -> list[dict[str, Any]]:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def launch(
    command: list[str],
    workspace: Path,
    env: dict[str, str],
    shell_user: str | None,
    limits: ShellLimits,
    isolate_network: bool = True,
) -> tuple[subprocess.Popen[bytes], Isolation]:
    """Start `command` contained, in its own session, with piped stdout and stderr.

    With `isolate_network` off the command keeps the worker's network (only for deployments that
    cut the network otherwise, or whose commands need it).

    Returns once the command itself runs (its launcher has exec'd). Raises a permanent
    `ActionError` when it cannot run: no such program, not executable, no shell user, or a
    containment step that failed (then nothing ran).
    """
    program = command[0]
    target = _target(shell_user, workspace)
    config = {
        "limits": {
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "processes": limits.processes,
            "file_size_bytes": limits.file_size_bytes,
            "open_files": limits.open_files,
        },
        "uid": target.uid,
        "gid": target.gid,
        "isolate_network": isolate_network,
    }
    status_r, status_w = os.pipe()
    try:
        config["status_fd"] = status_w
        argv = [sys.executable, "-I", "-S", str(CHILD_SCRIPT), json.dumps(config), "--", *command]
        try:
            proc = subprocess.Popen(
                argv,
                cwd=workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(status_w,),
            )
        except OSError as exc:
            raise ActionError.permanent(
                f"cannot start the shell launcher for {program}: {exc.strerror or exc}"
            ) from exc
        os.close(status_w)
        status_w = -1
        reports = _read_status(status_r)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
    report = {key: value for item in reports for key, value in item.items()}
    if "network" not in report or "exec_error" in report:
        _discard(proc)
        if "exec_error" in report:
            raise _exec_failure(program, int(report["exec_error"]), str(report.get("message")))
        why = report.get("setup_error", f"the launcher exited with {proc.returncode}")
        raise ActionError.permanent(f"cannot contain {program}, not run: {why}")
    isolation = Isolation(target.user, str(report["network"]))
    if isolate_network and isolation.network != "none":
        log.warning("shell: %s runs with the worker's network (%s)", program, isolation.network)
    return proc, isolation


def _discard(proc: subprocess.Popen[bytes]) -> None:
    """Reap a launcher that did not become the command, and close its pipes."""
    proc.communicate()


def _stderr_line(stderr: str, needles: tuple[str, ...]) -> str | None:
    for line in stderr.splitlines():
        lowered = line.lower()
        if any(needle in lowered for needle in needles):
            return line.strip()[:200]
    return None


_SYSCALL_LIMITS = (
    ("process", ("cannot fork", "can't fork", "resource temporarily unavailable")),
    ("memory", ("cannot allocate memory", "memoryerror", "out of memory", "memory exhausted")),
    ("open files", ("too many open files",)),
)


def limit_hit(returncode: int, cpu_used_s: float, stderr: str, limits: ShellLimits) -> str | None:
    """Which limit stopped a command that ended with `returncode`, or None.

    The kernel says so for CPU time (SIGXCPU, or SIGKILL at the hard limit with the CPU time
    used) and file size (SIGXFSZ). The process, memory and open-file limits only make a system
    call fail, and the command decides what to do; when it exits non-zero with the standard
    message of that failure on stderr (EAGAIN from fork, ENOMEM, EMFILE), that limit is named.
    """
    cpu = f"the CPU time limit ({limits.cpu_s} s, {cpu_used_s:.1f} s used)"
    if returncode == -signal.SIGXCPU:
        return cpu
    if returncode == -signal.SIGKILL and cpu_used_s >= limits.cpu_s:
        return cpu
    if returncode == -signal.SIGXFSZ:
        return f"the file size limit ({limits.file_size_bytes} bytes)"
    if returncode == 0:
        return None
    allowances = {
        "process": f"{limits.processes} more processes than its user already runs",
        "memory": f"{limits.memory_bytes} bytes of address space",
        "open files": f"{limits.open_files} open files",
    }
    for name, needles in _SYSCALL_LIMITS:
        line = _stderr_line(stderr, needles)
        if line is not None:
            return f"the {name} limit ({allowances[name]}); it said: {line!r}"
    return None
