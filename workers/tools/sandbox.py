"""How `shell` starts a command contained, ends everything it started, and tells which limit
stopped one.

`launch` contains the call first (`containment`: a cgroup of its own, else a uid of its own, else
a refusal unless best effort is on), then starts `sandbox_child.py` with a clean environment in
the workspace; the launcher joins the call's cgroup, sets the resource limits, isolates the
network and the process ids (a PID namespace) when the kernel allows it, and, when the worker
runs as root, becomes the unprivileged `shell_user` (or the call's own uid) before it execs the
command. What it could and could not do comes back as an `Isolation`, which the result carries
and the log warns about. `Launched.kill` and `Launched.finish` end whatever the command started.

What this does not do (see the README): it is not a container. A command running as the worker's
own user (a worker that is not root) can read every file that user can read and signal its
processes; only their memory and environment are closed to it (`workers.hardening`).
"""

from __future__ import annotations

import contextlib
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
from workers.tools import containment
from workers.tools.containment import CallContainment

__all__ = ["Isolation", "Launched", "ShellLimits", "launch", "limit_hit"]

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class ShellLimits:
    """What one `shell` call may use. `processes` is the call's own cap, whatever other calls
    run (in best effort only: beyond what its user already runs)."""

    cpu_s: int = 10
    memory_bytes: int = 1024 * 1024 * 1024
    processes: int = 64
    file_size_bytes: int = 64 * 1024 * 1024
    open_files: int = 256
    output_bytes: int = 1024 * 1024
    """Output read per stream before the command is stopped (only 64 KiB of it are kept)."""


@dataclass(frozen=True)
class Isolation:
    """Who the command ran as; its network: "none", or "shared: <why not isolated>"; and what
    ends its processes with the call and caps them (e.g. "pid namespace + cgroup v1 pids +
    freezer (max 64)", or "best effort: ...")."""

    user: str
    network: str
    containment: str

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
    best_effort: bool = False,
) -> Launched:
    """Start `command` contained, in its own session, with piped stdout and stderr.

    With `isolate_network` off the command keeps the worker's network (only for deployments that
    cut the network otherwise, or whose commands need it). With `best_effort` it runs even when
    no containment of the call is available (see `containment`).

    Returns once the command itself runs (its launcher has exec'd it). Raises a permanent
    `ActionError` when it cannot run: no such program, not executable, no shell user, no
    containment, or a containment step that failed (then nothing ran).
    """
    target = _target(shell_user, workspace)
    call = containment.open_call(limits.processes, best_effort)
    try:
        return _start(command, workspace, env, target, limits, isolate_network, call)
    except BaseException:
        call.close()
        raise


def _start(
    command: list[str],
    workspace: Path,
    env: dict[str, str],
    target: _Target,
    limits: ShellLimits,
    isolate_network: bool,
    call: CallContainment,
) -> Launched:
    program = command[0]
    uid, user = target.uid, target.user
    if call.uid is not None:
        uid = call.uid
        user = f"uid {call.uid} (the call's own; group of {target.user})"
        # It writes where the shell user's group may (its umask is 002); what it leaves in the
        # workspace is handed back to the shell user after the call.
        mode = workspace.stat().st_mode & 0o7777
        if mode & 0o070 != 0o070:
            os.chmod(workspace, mode | 0o070)
    config = {
        "limits": {
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "processes": limits.processes,
            "file_size_bytes": limits.file_size_bytes,
            "open_files": limits.open_files,
        },
        "uid": uid,
        "gid": target.gid,
        "isolate_network": isolate_network,
        "parent": os.getpid(),
        **call.launcher_config(),
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
        try:
            reports = _read_status(status_r)
        except BaseException:  # e.g. Celery's soft time limit: nothing may run unwatched
            _abort(proc)
            raise
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
    pid_namespace = report.get("pid_namespace", "not reported")
    held = call.describe(None if pid_namespace is None else str(pid_namespace))
    isolation = Isolation(user, str(report["network"]), held)
    if isolate_network and isolation.network != "none":
        log.warning("shell: %s runs with the worker's network (%s)", program, isolation.network)
    if call.best_effort:
        log.warning("shell: %s runs without containment of its own (%s)", program, held)
    elif pid_namespace is not None:
        log.info("shell: %s runs without a pid namespace (%s)", program, pid_namespace)
    init = report.get("init_pid")
    try:
        init_pidfd = _pidfd_of_child(int(init), proc.pid) if init is not None else None
        return Launched(proc, isolation, call, workspace, target, init_pidfd)
    except BaseException:
        _abort(proc)
        raise


def _pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd of `pid` if it is still a child of `parent` (the launcher, unreaped, so `pid`
    cannot be another process that merely reuses the number), else None."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None  # it exited and the launcher reaped it: the command is over
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            ppid = next((line.split()[1] for line in status if line.startswith("PPid:")), "")
    except OSError:
        ppid = ""
    if ppid != str(parent):
        os.close(pidfd)
        return None
    return pidfd


@dataclass
class Launched:
    """A running command: its launcher process (whose exit is the command's), how it is
    isolated, and what ends it."""

    proc: subprocess.Popen[bytes]
    isolation: Isolation
    containment: CallContainment
    workspace: Path
    owner: _Target
    init_pidfd: int | None

    def kill(self) -> None:
        """SIGKILL the command and everything it started. With a PID namespace its init is
        killed, so the kernel kills the rest; the launcher exits once all of it is gone."""
        if self.init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            return
        # The launcher became the command (or follows the init's death): it is unreaped, so its
        # pid and group id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self) -> str | None:
        """Once the launcher is reaped: kill what is left in the call's cgroup or with its uid,
        release them, hand what a per-call uid left in the workspace to the shell user. Returns
        what could not be done, or None."""
        if self.init_pidfd is not None:
            os.close(self.init_pidfd)
            self.init_pidfd = None
        problem = self.containment.close()
        uid = self.containment.uid
        if uid is not None and self.owner.uid is not None and self.owner.gid is not None:
            _hand_back(self.workspace, uid, self.owner.uid, self.owner.gid)
        return problem


def _hand_back(workspace: Path, uid: int, owner_uid: int, owner_gid: int) -> None:
    """Give what `uid` owns in the workspace to the shell user (links are never followed)."""
    for _root, dirs, files, dir_fd in os.fwalk(workspace, follow_symlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_uid == uid:
                    os.chown(name, owner_uid, owner_gid, dir_fd=dir_fd, follow_symlinks=False)


def _abort(proc: subprocess.Popen[bytes]) -> None:
    """Kill a launcher that is still setting up, and reap it (its init, if it made one, dies
    with it: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


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


def limit_hit(
    returncode: int,
    cpu_used_s: float,
    stderr: str,
    limits: ShellLimits,
    process_cap: str | None = None,
) -> str | None:
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
        "process": process_cap or f"{limits.processes} processes for this call",
        "memory": f"{limits.memory_bytes} bytes of address space",
        "open files": f"{limits.open_files} open files",
    }
    for name, needles in _SYSCALL_LIMITS:
        line = _stderr_line(stderr, needles)
        if line is not None:
            return f"the {name} limit ({allowances[name]}); it said: {line!r}"
    return None
