"""The launcher that `shell` runs first: it confines itself, then becomes the command (exec).

Run as ``python -I -S sandbox_child.py CONFIG -- PROGRAM ARG...`` by `sandbox.launch`, in a fresh
single-threaded interpreter (forking a multi-threaded Celery worker and running Python code in the
child before exec, as `preexec_fn` does, can deadlock). Standard library only, no site-packages.

In order, before exec:

1. resource limits (`setrlimit`): CPU seconds, address space, processes, file size, open files,
   no core dumps. The process limit counts per user, so it is set to the number of processes
   and threads the user already has plus the allowance: "at most N more";
2. a new network namespace with no interface up, so the command has no network at all: as root
   directly (`unshare(CLONE_NEWNET)`), otherwise inside a new user namespace that maps only our
   own uid and gid. When the kernel refuses (a container's seccomp profile often does), the
   command runs with the worker's network and the report says so;
3. `no_new_privs`, so no setuid program can raise its privileges again;
4. as root: drop every group, then to the shell user's gid and uid (checked: no way back);
5. the default action for SIGPIPE and SIGXFSZ, which this interpreter ignores.

It reports on CONFIG's `status_fd` one JSON line (`user`, `network`), or `setup_error` (the
command does not run), or, if exec fails, `exec_error` (an errno). The descriptor is closed by
the exec, so the command cannot write to it, and the reader sees end-of-file once it runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys
from typing import Any

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38


def _report(fd: int, **fields: Any) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is `uid`: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        real, threads = -1, 1
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        real = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
        if real == uid:
            count += threads
    return count


def _set_limits(limits: dict[str, int], uid: int) -> None:
    cpu = limits["cpu_s"]
    # SIGXCPU at the soft limit, SIGKILL one second later for a command that ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_size_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    processes = _tasks_of(uid) + limits["processes"]
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> str | None:
    """None on success, else why it failed."""
    if _libc().unshare(flags) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as file:
        file.write(text)


def _isolate_network(as_root: bool) -> str:
    """Returns "none" when the command will have no network, else "shared: <why>"."""
    if as_root:
        error = _unshare(CLONE_NEWNET)
        return "none" if error is None else f"shared: unshare(CLONE_NEWNET) failed: {error}"
    uid, gid = os.getuid(), os.getgid()
    error = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if error is not None:
        return f"shared: unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {error}"
    # Map only ourselves: files the command creates keep the worker's uid and gid. A failure
    # here raises (setup error): without a mapping the command could not create any file.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return "none"


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getgroups():
        raise OSError(f"still uid {os.geteuid()} gid {os.getgid()} after dropping to {uid}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("could become root again after dropping privileges")


def _find(program: str) -> str:
    """The file `program` names, searched on PATH as the command's user sees it.

    Like execvp, but a PATH directory this user may not enter is skipped rather than reported as
    "permission denied" for a program that is simply not there.
    """
    if "/" in program:
        return program
    candidates = [
        os.path.join(directory or ".", program)
        for directory in os.environ.get("PATH", os.defpath).split(os.pathsep)
    ]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate  # exec says why it cannot run it
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    command = argv[3:]
    fd: int = config["status_fd"]
    uid: int | None = config["uid"]
    as_root = os.geteuid() == 0
    try:
        if as_root and uid is None:
            raise OSError("running as root without a shell user")
        _set_limits(config["limits"], os.getuid() if uid is None else uid)
        network = (
            _isolate_network(as_root)
            if config["isolate_network"]
            else "shared: isolation turned off (shell_isolate_network)"
        )
        if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        if uid is not None:
            _drop_privileges(uid, config["gid"])
    except Exception as exc:
        _report(fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(126)
    _report(fd, network=network)
    # Python ignores these at start-up and exec keeps "ignored": give the command the defaults
    # (SIGXFSZ is how the file size limit stops it, SIGPIPE how `yes | head` ends).
    for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    os.set_inheritable(fd, False)  # closed by the exec: the command never holds it
    try:
        os.execv(_find(command[0]), command)
    except OSError as exc:
        _report(fd, exec_error=exc.errno, message=exc.strerror or str(exc))
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv)
