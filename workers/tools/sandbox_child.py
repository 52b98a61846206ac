"""The launcher that `shell` runs first: it confines itself, then becomes the command (exec).

Run as ``python -I -S sandbox_child.py CONFIG -- PROGRAM ARG...`` by `sandbox.launch`, in a fresh
single-threaded interpreter (forking a multi-threaded Celery worker and running Python code in the
child before exec, as `preexec_fn` does, can deadlock). Standard library only, no site-packages.

In order, before anything of the command runs:

1. it dies with the worker (`PR_SET_PDEATHSIG`), and joins the call's cgroup when there is one
   (`containment`): everything it starts is in it, `setsid` or not;
2. resource limits (`setrlimit`): CPU seconds, address space, file size, open files, no core
   dumps, and processes (`RLIMIT_NPROC`, which counts per real uid): none of its own with a
   cgroup (`pids.max` caps the call), the allowance itself with a uid of the call's own, or, in
   best effort, the number of processes the user already has plus the allowance;
3. namespaces: a network namespace with no interface up, so no network at all, and a PID
   namespace: as root directly, otherwise inside a new user namespace that maps only our own
   uid and gid. When the kernel refuses the network namespace (a container's seccomp profile
   often does), the command runs with the worker's network and the report says so; without
   the PID namespace it runs as this process (the cgroup or its uid still ends what it starts);
4. with a PID namespace it forks the namespace's init (pid 1), which forks the command and
   reaps whatever is orphaned; when the command exits, the init exits, and the kernel kills
   every process left in the namespace before the init is gone. This launcher waits for the
   init and exits as the command did (its code, or the same signal);
5. in the command: `no_new_privs`, so no setuid program can raise its privileges again; as
   root: drop every group, then to the command's gid and uid (checked: no way back); the
   default action for SIGPIPE and SIGXFSZ, which this interpreter ignores.

It reports on CONFIG's `status_fd` JSON lines (`pid_namespace`: null when held, else why not;
`init_pid`; `network`), or `setup_error` (the command does not run), or, if exec fails,
`exec_error` (an errno). Every holder closes the descriptor before the command runs (the exec
closes the command's copy), so the reader sees end-of-file once it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
from typing import Any, NoReturn

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
LAUNCHER_OVERHEAD = 2
"""The launcher and the init are in the call's cgroup besides the command's processes."""


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


def _set_limits(limits: dict[str, int], nproc: str, uid: int, as_root: bool) -> None:
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
    if nproc == "absolute":  # a uid of the call's own: the count starts at zero
        processes = limits["processes"]
    elif nproc == "relative":  # best effort: a shared user, "at most N more"
        processes = _tasks_of(uid) + limits["processes"]
    else:  # the cgroup caps the call; a per-user count would let calls starve each other
        processes = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        if as_root:
            with contextlib.suppress(ValueError):  # raising it needs CAP_SYS_RESOURCE
                processes = resource.RLIM_INFINITY
                resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
                return
            processes = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        raise OSError(f"prctl({option}) failed: {os.strerror(ctypes.get_errno())}")


def _unshare(flags: int, name: str) -> str | None:
    """None on success, else why it failed."""
    if _libc().unshare(flags) != 0:
        return f"unshare({name}) failed: {os.strerror(ctypes.get_errno())}"
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as file:
        file.write(text)


def _namespaces(
    as_root: bool, isolate_network: bool, pid_namespace: bool
) -> tuple[str, str | None]:
    """(network, pid namespace): the network is "none" when the command will have none, else
    "shared: <why>"; the PID namespace None when held, else why not."""
    refused = None
    if not as_root and (isolate_network or pid_namespace):
        uid, gid = os.getuid(), os.getgid()
        refused = _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
        if refused is None:
            # Map only ourselves: files the command creates keep the worker's uid and gid. A
            # failure here raises (setup error): without a mapping no file could be created.
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
    if not isolate_network:
        network = "shared: isolation turned off (shell_isolate_network)"
    else:
        error = refused or _unshare(CLONE_NEWNET, "CLONE_NEWNET")
        network = "none" if error is None else f"shared: {error}"
    if not pid_namespace:
        return network, "turned off"
    return network, refused or _unshare(CLONE_NEWPID, "CLONE_NEWPID")


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


def _become_command(fd: int, config: dict[str, Any], command: list[str], network: str) -> NoReturn:
    """Drop privileges and exec the command (in whichever process runs this)."""
    uid: int | None = config["uid"]
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
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


def _init(
    fd: int, result_w: int, life_r: int, config: dict[str, Any], command: list[str], network: str
) -> NoReturn:
    """Pid 1 of the namespace: start the command, reap everything, and when the command has
    exited, tell the launcher how and exit (the kernel then kills the rest)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([life_r], [], [], 0)[0]:
        os._exit(1)  # end of file: the launcher died before we asked to follow it
    _prctl(PR_SET_DUMPABLE, 0)
    command_pid = os.fork()
    if command_pid == 0:
        os.close(result_w)
        os.close(life_r)
        _become_command(fd, config, command, network)
    os.close(fd)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == command_pid:
            break
    os.write(result_w, json.dumps({"status": status}).encode())
    os._exit(0)


def _exit_as(status: int | None) -> NoReturn:
    """Exit as a process with wait status `status` did (None: as one killed by SIGKILL)."""
    sig = signal.SIGKILL if status is None else None
    if status is not None and os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
    if sig is None:
        os._exit(os.waitstatus_to_exitcode(status or 0))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def _run_under_init(fd: int, config: dict[str, Any], command: list[str], network: str) -> NoReturn:
    result_r, result_w = os.pipe()
    life_r, life_w = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(result_r)
        os.close(life_w)
        try:
            _init(fd, result_w, life_r, config, command, network)
        finally:
            os._exit(125)
    os.close(result_w)
    os.close(life_r)
    _report(fd, pid_namespace=None, init_pid=init)
    os.close(fd)
    os.waitpid(init, 0)
    data = b""
    while chunk := os.read(result_r, 4096):
        data += chunk
    try:
        status: int | None = int(json.loads(data)["status"])
    except (ValueError, KeyError, TypeError):
        status = None  # the init was killed: so is the call
    _exit_as(status)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    command = argv[3:]
    fd: int = config["status_fd"]
    uid: int | None = config["uid"]
    as_root = os.geteuid() == 0
    try:
        if as_root and uid is None:
            raise OSError("running as root without a shell user")
        cgroup = config["cgroup"]
        for procs in cgroup["procs"] if cgroup else ():
            _write(procs, "0")
        _set_limits(config["limits"], config["nproc"], os.getuid() if uid is None else uid, as_root)
        network, pid_namespace = _namespaces(
            as_root, config["isolate_network"], config["pid_namespace"]
        )
        # Die with the worker (set after the namespaces: a new user namespace clears it).
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != config["parent"]:
            raise OSError("the worker is gone")
        if cgroup:
            overhead = LAUNCHER_OVERHEAD if pid_namespace is None else 0
            _write(cgroup["pids_max"], str(cgroup["processes"] + overhead))
        if config["umask"] is not None:
            os.umask(config["umask"])
    except Exception as exc:
        _report(fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(126)
    if pid_namespace is None:
        _run_under_init(fd, config, command, network)
    _report(fd, pid_namespace=pid_namespace)
    _become_command(fd, config, command, network)


if __name__ == "__main__":
    main(sys.argv)
