"""How the file tools reach the workspace: through descriptors, never leaving it.

Anything that can write in the workspace (an agent's `shell` command first of all) can change the
tree at any moment, for instance exchange a folder and a symlink (`renameat2(RENAME_EXCHANGE)`)
between a tool's check of a path and its use of it. So no path is checked and then used here:

- the workspace directory is opened once per operation, by its configured path (trusted: keep it
  out of directories an agent's user can write, e.g. not directly in `/tmp`);
- every further component is opened relative to the descriptor of the one before it, with
  `O_NOFOLLOW | O_DIRECTORY`: a symlink anywhere in the path is refused ("path ... goes through a
  symbolic link (...): refused"), even one that would resolve inside the workspace (the
  path-based tools before this followed those), and `..` never reaches the kernel (paths are
  folded lexically first, `workers.tools.base.workspace_parts`);
- the last component is acted on relative to its directory's descriptor: opened with
  `O_NOFOLLOW | O_NONBLOCK` and checked with `fstat` (only regular files are read or written: a
  FIFO does not block a tool), created with `O_CREAT | O_EXCL | O_NOFOLLOW` and moved into place
  with `os.replace(src_dir_fd=, dst_dir_fd=)`, or removed with `unlink(dir_fd=)`;
- a regular file with more than one link that the workspace's user does not own is not read: a
  hard link would otherwise hand over a file that user cannot read by its own name;
- when the worker runs as root, the walk and the operation run with the file-system identity of
  the workspace's user (`shell_user`, the user `shell` commands run as): `setfsuid`/`setfsgid`,
  and no supplementary groups, in the calling thread only, undone in a `finally`. A case the walk
  missed would then still reach only what that user reaches with its own commands. The worker
  opens the workspace directory itself as root and hands it to that user (as `shell` does).

`before_use` is a hook for tests: it is called once the walk holds the descriptor of the last
component's directory, right before that component is acted on: where a path-based tool had its
gap between check and use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import platform
import pwd
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from governance.policy.errors import ActionError
from workers.tools.base import ToolEnv, file_parts

__all__ = [
    "WorkspaceUser",
    "as_user",
    "before_use",
    "delete_file",
    "read_file",
    "workspace_user",
    "write_file",
]

log = logging.getLogger(__name__)


def _no_hook(relative: str) -> None:
    """The default `before_use`: nothing."""


before_use: Callable[[str], None] = _no_hook
"""Called with the tool's path after the walk and before the use (tests swap components here)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# setgroups(2) as a raw system call changes the calling thread only (glibc's wrapper changes every
# thread of the process); only where its number is known.
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}


# --- who touches the files -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceUser:
    """The user the workspace belongs to; `switch` when the worker is root and must become it."""

    uid: int
    gid: int
    name: str
    switch: bool


def workspace_user(env: ToolEnv) -> WorkspaceUser:
    """`env.shell_user` when the worker is root, else the worker's own user.

    As root, a missing, unknown or root `shell_user` is a permanent failure: the file tools refuse
    to touch the workspace as root, as `shell` refuses to run commands as root.
    """
    if os.geteuid() != 0:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return WorkspaceUser(uid, os.getegid(), name, switch=False)
    if not env.shell_user:
        raise ActionError.permanent(
            "the worker runs as root and no shell_user is configured: refusing to touch the "
            "workspace as root (set GOVERNANCE_SHELL_USER to an unprivileged user)"
        )
    try:
        entry = pwd.getpwnam(env.shell_user)
    except KeyError:
        raise ActionError.permanent(
            f"shell_user {env.shell_user!r} does not exist: refusing to touch the workspace as root"
        ) from None
    if entry.pw_uid == 0:
        raise ActionError.permanent(
            f"shell_user {env.shell_user!r} is root: it must be unprivileged"
        )
    return WorkspaceUser(entry.pw_uid, entry.pw_gid, env.shell_user, switch=True)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    for name in ("setfsuid", "setfsgid"):
        function = getattr(libc, name)
        function.argtypes = [ctypes.c_uint]
        function.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


_UNCHANGED = 0xFFFFFFFF  # (uid_t) -1: an invalid id, so setfsuid only reports the current one


def _setfsuid(uid: int) -> int:
    """Set this thread's file-system uid; the previous one."""
    return int(_libc().setfsuid(uid)) & 0xFFFFFFFF


def _setfsgid(gid: int) -> int:
    """Set this thread's file-system gid; the previous one."""
    return int(_libc().setfsgid(gid)) & 0xFFFFFFFF


def fs_ids() -> tuple[int, int]:
    """This thread's file-system uid and gid."""
    return _setfsuid(_UNCHANGED), _setfsgid(_UNCHANGED)


def _thread_setgroups(groups: Sequence[int]) -> None:
    number = _SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no setgroups system call number for {platform.machine()}")
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc().syscall(ctypes.c_long(number), ctypes.c_long(len(groups)), array) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@functools.cache
def _warn_groups_kept(machine: str) -> None:
    log.warning(
        "file tools: cannot drop the worker's supplementary groups per thread on %s: files of "
        "those groups stay reachable to them",
        machine,
    )


@contextlib.contextmanager
def as_user(user: WorkspaceUser) -> Iterator[None]:
    """Run the block with `user`'s file-system identity in this thread (when `user.switch`).

    Only this thread changes (the fsuid, fsgid and groups are per thread in Linux; the groups go
    through the raw system call, as glibc's `setgroups` would change every thread), and it is
    switched back before the block's exception, if any, goes on: another task of a thread pool,
    or the next task of this pool process, never runs with it. A thread started inside the block
    would inherit the identity: the file operations start none. In a greenlet pool (gevent,
    eventlet) the block holds its thread, as its plain `os` calls never yield to another
    greenlet.
    """
    if not user.switch:
        yield
        return
    groups = os.getgroups()
    dropped = False
    if groups:
        try:
            _thread_setgroups([])
            dropped = True
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _warn_groups_kept(platform.machine())
    old_gid = _setfsgid(user.gid)
    old_uid = _setfsuid(user.uid)
    try:
        if fs_ids() != (user.uid, user.gid):
            raise ActionError.permanent(
                f"cannot take the file-system identity of {user.name} (uid {user.uid}): "
                "refusing to touch the workspace as root"
            )
        yield
    finally:
        _setfsuid(old_uid)
        _setfsgid(old_gid)
        if dropped:
            _thread_setgroups(groups)
        if fs_ids() != (old_uid, old_gid) or (dropped and os.getgroups() != groups):
            raise RuntimeError("could not restore the worker's file-system identity")


# --- the walk --------------------------------------------------------------------------------


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Missing(Exception):
    """A directory on the way does not exist (and is not to be created)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "an unknown kind of file"


def _symlink_refused(relative: str, where: str) -> ActionError:
    return ActionError.permanent(
        f"path {relative!r} goes through a symbolic link ({where}): refused"
    )


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    """What `name` is in `dir_fd`, not following a symlink; None when there is nothing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_dir(dir_fd: int, name: str, relative: str, where: str, create: bool) -> int:
    """Open directory `name` in `dir_fd` without following it (making it first when `create`)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise _Missing(where) from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    # ENOTDIR or ELOOP: a symlink (O_NOFOLLOW) or something else that is no directory.
    found = _lstat(dir_fd, name)
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise _symlink_refused(relative, where)
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise ActionError.permanent(
            f"path {relative!r}: {where} changed while it was walked (a symbolic link or no "
            "directory when opened): refused"
        )
    raise ActionError.permanent(f"path {relative!r}: {where} is not a directory")


@contextlib.contextmanager
def _parent(
    env: ToolEnv, user: WorkspaceUser, relative: str, *, create: bool
) -> Iterator[tuple[int, str, str]]:
    """As the workspace's user: the descriptor of the directory holding the path's last
    component, that component's name, and the path as the tools report it.

    Raises `_Missing` when a directory on the way is missing and `create` is false.
    """
    parts = file_parts(relative)
    try:
        fd = os.open(env.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ActionError.permanent(
            f"workspace is not a directory: {env.workspace} ({exc.strerror or exc})"
        ) from exc
    try:
        if user.switch and os.fstat(fd).st_uid != user.uid:
            # The user gets the workspace directory, as `shell` gives it (the directory only).
            os.fchown(fd, user.uid, user.gid)
        with as_user(user):
            for index, name in enumerate(parts[:-1]):
                where = "/".join(parts[: index + 1])
                next_fd = _open_dir(fd, name, relative, where, create)
                _close(fd)
                fd = next_fd
            before_use(relative)
            yield fd, parts[-1], "/".join(parts)
    finally:
        _close(fd)


def _refuse_irregular(found: os.stat_result, relative: str, shown: str, dir_word: str) -> None:
    if stat.S_ISLNK(found.st_mode):
        raise _symlink_refused(relative, shown)
    if stat.S_ISDIR(found.st_mode):
        raise ActionError.permanent(f"{dir_word}: {relative}")
    if not stat.S_ISREG(found.st_mode):
        raise ActionError.permanent(
            f"not a regular file: {relative} ({_kind(found.st_mode)}): refused"
        )


# --- the operations --------------------------------------------------------------------------


def read_file(env: ToolEnv, relative: str, limit: int) -> tuple[str, bytes]:
    """The path as reported, and up to `limit + 1` bytes of the regular file `relative`."""
    user = workspace_user(env)
    try:
        with _parent(env, user, relative, create=False) as (dir_fd, name, shown):
            found = _lstat(dir_fd, name)
            if found is None:
                raise ActionError.permanent(f"no such file: {relative}")
            _refuse_irregular(found, relative, shown, "not a file")
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                raise ActionError.permanent(f"no such file: {relative}") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _symlink_refused(relative, shown) from None
                raise
            try:
                opened = os.fstat(fd)
                _refuse_irregular(opened, relative, shown, "not a file")
                if opened.st_nlink > 1 and opened.st_uid != user.uid:
                    raise ActionError.permanent(
                        f"{relative} has {opened.st_nlink} hard links and {user.name} does not "
                        "own it: refused"
                    )
                chunks: list[bytes] = []
                size = 0
                while size <= limit:
                    chunk = os.read(fd, min(1 << 16, limit + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            finally:
                _close(fd)
            return shown, b"".join(chunks)
    except _Missing:
        raise ActionError.permanent(f"no such file: {relative}") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot read {relative}: {exc.strerror or exc}") from exc


def write_file(env: ToolEnv, relative: str, data: bytes, overwrite: bool) -> str:
    """Write `data` to `relative` atomically, making missing directories; the path as reported.

    The data goes to a new temporary file next to the target (`O_EXCL | O_NOFOLLOW`), is flushed
    to disk, and replaces the target in one rename relative to the directory's descriptor (or,
    with `overwrite` false, is linked to it, which fails if the target exists), so a reader never
    sees half a file and two writers without `overwrite` cannot both win. A symlink or another
    non-regular file at the target is refused.
    """
    user = workspace_user(env)
    try:
        with _parent(env, user, relative, create=True) as (dir_fd, name, shown):
            found = _lstat(dir_fd, name)
            if found is not None:
                _refuse_irregular(found, relative, shown, "is a directory")
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "file exists")
            temp = f".{name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(temp, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    _close(fd)
                if overwrite:
                    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                else:
                    os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=dir_fd)
            return shown
    except FileExistsError:
        raise ActionError.permanent(f"file exists: {relative} (overwrite is false)") from None
    except IsADirectoryError:
        raise ActionError.permanent(f"is a directory: {relative}") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot write {relative}: {exc.strerror or exc}") from exc


def delete_file(env: ToolEnv, relative: str) -> tuple[str, bool]:
    """Remove the name `relative` (not a directory, not through or at a symlink); the path as
    reported and whether there was something to remove.

    `unlink` removes the name, never what a link points to: a hard link removed leaves its file.
    """
    user = workspace_user(env)
    try:
        with _parent(env, user, relative, create=False) as (dir_fd, name, shown):
            found = _lstat(dir_fd, name)
            if found is None:
                return shown, False
            if stat.S_ISLNK(found.st_mode):
                raise _symlink_refused(relative, shown)
            if stat.S_ISDIR(found.st_mode):
                raise ActionError.permanent(f"is a directory: {relative}")
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return shown, False
            return shown, True
    except _Missing:
        return "/".join(file_parts(relative)), False
    except IsADirectoryError:
        raise ActionError.permanent(f"is a directory: {relative}") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot delete {relative}: {exc.strerror or exc}") from exc
