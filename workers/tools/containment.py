"""Per-call containment of `shell`: every process a command starts ends with the call, and the
call's process cap is absolute and its own, so one call can neither leave survivors behind nor
starve another.

What holds is detected once per process (`detect`, cached), in this order:

1. **a cgroup per call** with an absolute `pids.max`: cgroup v2 (`pids` controller, and
   `cgroup.kill` to end the call) where a writable cgroup2 hierarchy delegates `pids`, else
   cgroup v1 (a `pids` hierarchy, and `freezer` when mounted, to kill what is inside
   atomically). The launcher joins the call's cgroup before it starts anything; at the end
   everything in it is killed and the directory removed. The command runs as `shell_user`.
2. otherwise, as root, **a uid of the call's own**, a numeric uid from `UID_BASE` ..
   `UID_BASE + UID_COUNT - 1` that no user and no running process has, claimed with a lock
   file for the call: `RLIMIT_NPROC` (which counts per real uid) is then an absolute cap of
   the call's own; at the end every process with that uid is killed. The command's group is
   `shell_user`'s; the workspace directory is made group-writable, the command's umask is 002,
   and after the call what it left in the workspace is handed to `shell_user` (lchown, links
   not followed). What is lost: files it made outside the workspace keep that uid, and it can
   only change files of earlier calls that its group may write.

In both, the launcher also tries **a PID namespace** (`sandbox_child`): the command runs under
a small init, pid 1 of a namespace of its own; when the command exits, the init exits and the
kernel kills whatever is left in the namespace, `setsid` or not, before the call returns.

Where neither 1 nor 2 is available, `shell` refuses to run (a permanent `ActionError` with the
reasons), unless the operator opted into best effort (`GOVERNANCE_SHELL_BEST_EFFORT`): then the
command runs under the PID namespace if the kernel allows one, with the old relative process
limit ("N more processes than its user already runs"), and the result and the log say so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import pwd
import secrets
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from governance import forksafe
from governance.policy.errors import ActionError

__all__ = [
    "Available",
    "CallContainment",
    "CgroupTree",
    "UidPool",
    "detect",
    "open_call",
]

log = logging.getLogger(__name__)

PREFIX = "gov-shell-"
"""Name prefix of the per-call cgroups (`gov-shell-<pid ns>-<pid>-<n>-<random>`)."""
UID_BASE = 1_900_000_000
"""First uid of the per-call range: above systemd's container ranges (up to 1879048191), below
its foreign range (from 2147352576); no user of the system may have one of these."""
UID_COUNT = 65_536
LAUNCHER_OVERHEAD = 2
"""Tasks the call's cgroup holds besides the command's: the launcher and, in a PID namespace,
the init (added to pids.max by the launcher once it knows)."""
EMPTY_WAIT_S = 5.0
"""How long the end of a call waits for what it killed to be gone."""

_counter = itertools.count()


# --- small helpers ----------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="ascii") as file:
        file.write(text)


def _read(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as file:
        return file.read()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _ns_tag() -> str:
    """Our PID namespace, so a sweep never takes a cgroup made by a worker of another one."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _status_fields(pid: int) -> dict[str, str] | None:
    try:
        text = _read(Path(f"/proc/{pid}/status"))
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _kill_checked(pid: int, still_ours: Callable[[int], bool]) -> bool:
    """SIGKILL `pid` if `still_ours(pid)` holds for the process a pidfd pins (no pid reuse can
    make this kill another process). True when a signal was sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            return False
        # A kernel before 5.3: check, then kill by number (a reuse in between is unlikely).
        if not still_ours(pid):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return True
        return False
    try:
        if not still_ours(pid):
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return True
        return False
    finally:
        os.close(pidfd)


# --- cgroups ----------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, file system type, super options) of each mount."""
    mounts = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Our cgroup path per v1 controller, and under "" the cgroup2 path."""
    own: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _hid, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    return own


def _dir_of(mount_root: str, mount_point: str, own: str) -> Path:
    """Our cgroup's directory in a hierarchy mounted at `mount_point` (showing `mount_root`)."""
    relative = own
    if mount_root != "/" and (own == mount_root or own.startswith(mount_root + "/")):
        relative = own[len(mount_root) :]
    return Path(mount_point) / relative.lstrip("/")


def _probe(base: Path, needs: tuple[str, ...]) -> None:
    """Make and remove a child cgroup of `base` that has the files in `needs` (raises)."""
    probe = base / f"{PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
    probe.mkdir()
    try:
        missing = [name for name in needs if not (probe / name).exists()]
        if missing:
            raise OSError(f"a cgroup made in {base} has no {', '.join(missing)}")
        if "pids.max" in needs:
            _write(probe / "pids.max", "64")
    finally:
        probe.rmdir()


@dataclass(frozen=True)
class CgroupTree:
    """Where the per-call cgroups are made: v2 (`base` only) or v1 (`base` is in the pids
    hierarchy, `freezer` in the freezer hierarchy when mounted)."""

    version: int
    base: Path
    freezer: Path | None = None

    @property
    def kind(self) -> str:
        if self.version == 2:
            return "cgroup v2 pids"
        return "cgroup v1 pids" + (" + freezer" if self.freezer else "")

    def create(self) -> CallCgroup:
        name = f"{PREFIX}{_ns_tag()}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        made: list[Path] = []
        try:
            for parent in (self.base, self.freezer):
                if parent is not None:
                    (parent / name).mkdir(mode=0o755)
                    made.append(parent / name)
        except OSError:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return CallCgroup(
            self.version, name, made[0], made[1] if len(made) > 1 else None, tuple(made)
        )

    def sweep(self) -> None:
        """Remove cgroups left by workers of this PID namespace that died during a call (and
        kill what is still in them)."""
        tag = f"{PREFIX}{_ns_tag()}-"
        try:
            names = [p.name for p in self.base.iterdir() if p.name.startswith(tag)]
        except OSError:
            return
        for name in names:
            try:
                creator = int(name[len(tag) :].split("-", 1)[0])
            except ValueError:
                continue
            if creator == os.getpid() or Path(f"/proc/{creator}").exists():
                continue
            dirs = tuple(p / name for p in (self.base, self.freezer) if p and (p / name).is_dir())
            if not dirs:
                continue
            freezer = (
                self.freezer / name if self.freezer and (self.freezer / name).is_dir() else None
            )
            stale = CallCgroup(self.version, name, self.base / name, freezer, dirs)
            if stale.close():
                log.info("shell: removed the cgroup %s a dead worker left", name)


@dataclass
class CallCgroup:
    """One call's cgroup (v1: the same name in the pids and, if mounted, freezer hierarchies)."""

    version: int
    name: str
    pids_dir: Path
    freezer_dir: Path | None
    dirs: tuple[Path, ...]

    def launcher_config(self, processes: int) -> dict[str, Any]:
        return {
            "procs": [str(path / "cgroup.procs") for path in self.dirs],
            "pids_max": str(self.pids_dir / "pids.max"),
            "processes": processes,
        }

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in _read(self.pids_dir / "cgroup.procs").split()]
        except OSError:
            return []

    def _member(self, pid: int) -> bool:
        try:
            lines = _read(Path(f"/proc/{pid}/cgroup")).splitlines()
        except OSError:
            return False
        return any(self.name in line.rsplit(":", 1)[-1].split("/") for line in lines)

    def kill(self) -> None:
        """SIGKILL everything in the cgroup."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.pids_dir / "cgroup.kill", "1")
                return
        freezer = self._freeze()
        try:
            # Frozen, nothing forks meanwhile; without a freezer the loop catches up (the
            # pids limit bounds it, and a process killed cannot fork any more).
            deadline = time.monotonic() + EMPTY_WAIT_S
            while time.monotonic() < deadline:
                if not any([_kill_checked(pid, self._member) for pid in self.pids()]):
                    break
                if freezer is not None:
                    break
        finally:
            if freezer is not None:
                with contextlib.suppress(OSError):
                    _write(freezer / "freezer.state", "THAWED")

    def _freeze(self) -> Path | None:
        """Freeze the call's processes (v1 freezer); its directory, or None when not frozen."""
        if self.freezer_dir is None:
            return None
        try:
            _write(self.freezer_dir / "freezer.state", "FROZEN")
            deadline = time.monotonic() + 1.0
            while _read(self.freezer_dir / "freezer.state").strip() != "FROZEN":
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        except OSError:
            return None
        return self.freezer_dir

    def wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        pause = 0.001
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    def close(self) -> bool:
        """Kill what is left, wait until it is gone, remove the cgroup. False (logged) when
        something could not be ended or removed; the next sweep tries again."""
        empty = not self.pids()
        if not empty:
            self.kill()
            empty = self.wait_empty(EMPTY_WAIT_S)
            if not empty:
                self.kill()
                empty = self.wait_empty(EMPTY_WAIT_S)
        if not empty:
            log.error("shell: processes still in the cgroup %s: %s", self.name, self.pids())
            return False
        removed = True
        for path in reversed(self.dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("shell: cannot remove the cgroup %s: %s", path, _why(exc))
                removed = False
        return removed


def _cgroup_v2(mounts: list[tuple[str, str, str, set[str]]], own: dict[str, str]) -> CgroupTree:
    found = [(root, point) for root, point, fstype, _opts in mounts if fstype == "cgroup2"]
    if not found:
        raise OSError("no cgroup2 file system is mounted")
    if "" not in own:
        raise OSError("this process has no cgroup2 path in /proc/self/cgroup")
    root, point = found[0]
    mine = _dir_of(root, point, own[""])
    at_root = mine == Path(point)
    controllers = _read(mine / "cgroup.controllers").split()
    if at_root:
        # The root of the hierarchy may have processes and children with controllers at once.
        if "pids" not in controllers:
            raise OSError(
                f"the pids controller is not available in {mine} (cgroup.controllers: "
                f"{' '.join(controllers) or 'none'}; it may be bound to cgroup v1)"
            )
        if "pids" not in _read(mine / "cgroup.subtree_control").split():
            _write(mine / "cgroup.subtree_control", "+pids")
        base = mine
    else:
        # A cgroup with processes (ours) cannot hand controllers to children: the calls get
        # siblings of ours, where the parent already delegates pids (as systemd's slices do).
        base = mine.parent
        if "pids" not in _read(base / "cgroup.subtree_control").split():
            raise OSError(f"{base} does not delegate the pids controller (cgroup.subtree_control)")
    _probe(base, ("pids.max", "cgroup.kill"))
    return CgroupTree(2, base)


def _cgroup_v1(mounts: list[tuple[str, str, str, set[str]]], own: dict[str, str]) -> CgroupTree:
    def hierarchy(controller: str) -> Path | None:
        for root, point, fstype, opts in mounts:
            if fstype == "cgroup" and controller in opts and controller in own:
                return _dir_of(root, point, own[controller])
        return None

    pids = hierarchy("pids")
    if pids is None:
        raise OSError("no cgroup v1 pids hierarchy is mounted")
    _probe(pids, ("pids.max",))
    freezer = hierarchy("freezer")
    if freezer is not None:
        try:
            _probe(freezer, ("freezer.state",))
        except OSError as exc:
            log.info("shell: the cgroup v1 freezer is not usable: %s", _why(exc))
            freezer = None
    return CgroupTree(1, pids, freezer)


# --- uids of the call's own -------------------------------------------------------------------


def _lock_dir() -> Path:
    """A directory only we may write to, for the uid locks (raises OSError saying why not)."""
    reasons = []
    for path in (Path("/run/governance-shell"), Path(tempfile.gettempdir()) / "governance-shell-0"):
        with contextlib.suppress(FileExistsError, OSError):
            path.mkdir(mode=0o700)
        try:
            info = os.lstat(path)
        except OSError as exc:
            reasons.append(f"{path}: {_why(exc)}")
            continue
        if not stat.S_ISDIR(info.st_mode):
            reasons.append(f"{path} is not a directory")
        elif info.st_uid != os.geteuid() or info.st_mode & 0o022:
            reasons.append(f"{path} is not ours alone (owner {info.st_uid}, mode {info.st_mode:o})")
        else:
            return path
    raise OSError("no directory for the uid locks: " + "; ".join(reasons))


def _real_uid(pid: int, zombies: bool = False) -> int | None:
    """The real uid of a running process (or, with `zombies`, of one not reaped yet)."""
    fields = _status_fields(pid)
    if fields is None or (not zombies and fields.get("State", "").startswith("Z")):
        return None  # gone, or a zombie (already dead: only its parent's wait is missing)
    try:
        return int(fields["Uid"].split()[0])
    except (KeyError, ValueError, IndexError):
        return None


def _pids_of_uid(uid: int, zombies: bool = False) -> list[int]:
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and _real_uid(int(entry), zombies) == uid
    ]


def kill_uid(uid: int, timeout_s: float = EMPTY_WAIT_S) -> bool:
    """SIGKILL every process whose real uid is `uid` until none is left; False on timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while pids := _pids_of_uid(uid):
        for pid in pids:
            _kill_checked(pid, lambda p: _real_uid(p) == uid)
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


@dataclass(frozen=True)
class UidPool:
    """The range of per-call uids, claimed with a lock file each in `lock_dir`."""

    lock_dir: Path

    def claim(self) -> UidSlot:
        """The lowest uid of the range no call holds (so few lock files are ever made)."""
        for uid in range(UID_BASE, UID_BASE + UID_COUNT):
            try:
                pwd.getpwuid(uid)
                continue  # a user of the system: never ours
            except KeyError:
                pass
            fd = os.open(
                self.lock_dir / f"{uid}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            # Ours now. What still runs with it was left by a worker that died during a call.
            # Zombies not reaped yet still count for RLIMIT_NPROC: such a uid waits its turn.
            if not kill_uid(uid):
                log.error("shell: processes of uid %d survive SIGKILL; skipping that uid", uid)
            elif not _pids_of_uid(uid, zombies=True):
                return UidSlot(uid, fd)
            os.close(fd)
        raise ActionError.permanent("shell: every uid of the per-call range is in use")

    def sweep(self) -> None:
        """Kill what runs with a uid of the range that no worker holds (left by a worker that
        died during a call)."""
        in_range = set()
        for entry in os.listdir("/proc"):
            uid = _real_uid(int(entry)) if entry.isdigit() else None
            if uid is not None and UID_BASE <= uid < UID_BASE + UID_COUNT:
                in_range.add(uid)
        for uid in sorted(in_range):
            try:
                fd = os.open(
                    self.lock_dir / f"{uid}.lock",
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live call's
            if kill_uid(uid):
                log.info("shell: killed what a dead worker's call left running as uid %d", uid)
            os.close(fd)


@dataclass
class UidSlot:
    uid: int
    fd: int

    def release(self) -> bool:
        """Kill every process of the uid, then give it back. False when some survived (the
        uid stays locked by this process)."""
        if not kill_uid(self.uid):
            log.error("shell: processes of uid %d survive SIGKILL", self.uid)
            return False
        os.close(self.fd)
        return True


# --- detection and the per-call object ---------------------------------------------------------


@dataclass(frozen=True)
class Available:
    """What this process can contain a call with: a cgroup tree, per-call uids, whether to try
    a PID namespace; `why_not` says why what is missing is."""

    cgroup: CgroupTree | None
    uids: UidPool | None
    pid_namespace: bool = True
    why_not: tuple[str, ...] = ()


_detected: Available | None = None
_detect_lock = forksafe.lock()


def _detect() -> Available:
    why_not = []
    cgroup: CgroupTree | None = None
    try:
        mounts, own = _mountinfo(), _own_cgroups()
    except OSError as exc:
        mounts, own = [], {}
        why_not.append(f"cgroups: cannot read /proc/self: {_why(exc)}")
    for version, find in ((2, _cgroup_v2), (1, _cgroup_v1)):
        try:
            cgroup = find(mounts, own)
            break
        except (OSError, ValueError) as exc:
            why_not.append(f"cgroup v{version}: {_why(exc)}")
    uids: UidPool | None = None
    if cgroup is not None:
        cgroup.sweep()
    elif os.geteuid() != 0:
        why_not.append("per-call uid: the worker is not root, so it cannot switch to one")
    else:
        try:
            uids = UidPool(_lock_dir())
        except OSError as exc:
            why_not.append(f"per-call uid: {_why(exc)}")
        else:
            uids.sweep()
    found = Available(cgroup, uids, True, tuple(why_not))
    if cgroup is not None:
        log.info(
            "shell: each call gets a cgroup of its own (%s) under %s", cgroup.kind, cgroup.base
        )
    elif uids is not None:
        log.warning(
            "shell: no cgroup (%s); each call runs as a uid of its own instead",
            "; ".join(why_not),
        )
    else:
        log.warning("shell: no containment available: %s", "; ".join(why_not))
    return found


def detect() -> Available:
    """What is available, detected once per process (and inherited by its forks)."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _detect()
        return _detected


@dataclass
class CallContainment:
    """How one call is contained; `close` ends whatever of it is left, and cleans up."""

    processes: int
    cgroup: CallCgroup | None = None
    uid_slot: UidSlot | None = None
    kind: str = ""
    pid_namespace: bool = True
    best_effort: bool = False
    closed: bool = field(default=False, repr=False)

    @property
    def uid(self) -> int | None:
        return self.uid_slot.uid if self.uid_slot else None

    @property
    def cap(self) -> str:
        """The process cap, as a limit's reason names it."""
        if self.best_effort:
            return f"{self.processes} more processes than its user already runs"
        return f"{self.processes} processes for this call"

    def launcher_config(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup.launcher_config(self.processes) if self.cgroup else None,
            "nproc": (
                "relative" if self.best_effort else "absolute" if self.uid_slot else "unlimited"
            ),
            "pid_namespace": self.pid_namespace,
            "umask": 0o002 if self.uid_slot else None,
        }

    def describe(self, pid_namespace: str | None) -> str:
        """What held, e.g. "pid namespace + cgroup v1 pids + freezer (max 64)"; `pid_namespace`
        is None when the command got one, else why not."""
        if self.best_effort:
            held = "pid namespace" if pid_namespace is None else "process group only"
            text = f"best effort: {held}, process cap relative ({self.cap})"
        else:
            parts = ["pid namespace"] if pid_namespace is None else []
            parts.append(self.kind)
            text = " + ".join(parts) + f" (max {self.processes})"
        if pid_namespace is not None:
            text += f"; no pid namespace: {pid_namespace}"
        return text

    def close(self) -> str | None:
        """Kill what is left of the call and release what it held; what went wrong, or None."""
        if self.closed:
            return None
        self.closed = True
        problems = []
        if self.cgroup is not None and not self.cgroup.close():
            problems.append(f"processes left in the cgroup {self.cgroup.name}")
        if self.uid_slot is not None and not self.uid_slot.release():
            problems.append(f"processes of uid {self.uid_slot.uid} survive SIGKILL")
        return "; ".join(problems) or None


def open_call(processes: int, best_effort: bool) -> CallContainment:
    """Contain a new call (a cgroup, else a uid of its own), or refuse unless `best_effort`."""
    available = detect()
    pidns = available.pid_namespace
    if available.cgroup is not None:
        try:
            cgroup = available.cgroup.create()
        except OSError as exc:
            raise ActionError.permanent(
                f"cannot contain the command, not run: cannot make its cgroup: {_why(exc)}"
            ) from exc
        return CallContainment(
            processes, cgroup=cgroup, kind=available.cgroup.kind, pid_namespace=pidns
        )
    if available.uids is not None:
        try:
            slot = available.uids.claim()
        except OSError as exc:
            raise ActionError.permanent(
                f"cannot contain the command, not run: cannot claim a uid: {_why(exc)}"
            ) from exc
        return CallContainment(
            processes, uid_slot=slot, kind=f"uid {slot.uid} of its own", pid_namespace=pidns
        )
    if best_effort:
        return CallContainment(processes, kind="best effort", pid_namespace=pidns, best_effort=True)
    raise ActionError.permanent(
        "shell refuses to run: no way to end every process of the command with the call and to "
        f"cap its processes per call ({'; '.join(available.why_not)}). Give the worker a cgroup "
        "it may write (or run it as root), or set GOVERNANCE_SHELL_BEST_EFFORT=true to run "
        "commands without that guarantee"
    )
