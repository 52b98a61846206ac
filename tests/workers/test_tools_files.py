"""`read_file`, `write_file` and `delete_file` on a real directory, and the workspace boundary.

The boundary holds whatever runs concurrently: a folder of the path exchanged for a symlink
between the tools' resolving and their use (deterministically, at `workspace.before_use`, where
the path-based tools had their gap, which is shown to escape), and the same exchange in a loop
in another thread for a bounded time. Each of the two layers is shown on its own: the descriptor
walk (with the worker's identity, even as root) and, as root, the workspace user's file-system
identity (with a walk made to follow symlinks).

Tests that need root say so and skip elsewhere (CI runs them as root): the identity switch, a
file owned by another user, and targets only root may touch.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from workers.tools import TOOLS, InputRejected, ToolEnv, resolve_in_workspace, validate_input
from workers.tools import workspace as ws
from workers.tools.base import workspace_parts

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not AS_ROOT,
    reason="needs root (CI runs as root): the workspace user's file-system identity, files of "
    "another owner and root-only targets",
)
FILE_TOOLS = ("read_file", "write_file", "delete_file")
SECRET = "TOP-SECRET root-only content"
DECOY = "decoy inside the workspace"


def call(tool: str, raw: dict[str, Any], workspace: Path, **env: Any) -> dict[str, Any]:
    """Validate and run a tool the way the Celery glue does."""
    tool_env = ToolEnv(workspace=workspace, **env)
    spec = TOOLS[tool]
    return spec.run(validate_input(spec, raw, tool_env), tool_env)


def workspace_owner() -> tuple[int, int]:
    """Who the tools act as: `nobody` for a root worker, else ourselves."""
    if AS_ROOT:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    return os.geteuid(), os.getegid()


def give(*paths: Path) -> None:
    """Make `paths` the workspace user's, as if its `shell` command had made them."""
    uid, gid = workspace_owner()
    for path in paths:
        os.chown(path, uid, gid, follow_symlinks=False)


def test_write_read_delete_round_trip(workspace: Path) -> None:
    written = call("write_file", {"path": "notes/a.txt", "content": "héllo\n"}, workspace)
    assert written == {"path": "notes/a.txt", "bytes": len("héllo\n".encode())}
    assert (workspace / "notes" / "a.txt").read_text(encoding="utf-8") == "héllo\n"

    read = call("read_file", {"path": "notes/a.txt"}, workspace)
    assert read == {"path": "notes/a.txt", "content": "héllo\n", "bytes": 7}

    assert call("delete_file", {"path": "notes/a.txt"}, workspace) == {
        "path": "notes/a.txt",
        "deleted": True,
    }
    assert not (workspace / "notes" / "a.txt").exists()
    assert call("delete_file", {"path": "notes/a.txt"}, workspace)["deleted"] is False
    assert call("delete_file", {"path": "none/such/a.txt"}, workspace)["deleted"] is False


def test_paths_are_reported_folded(workspace: Path) -> None:
    written = call("write_file", {"path": "./a//b/../c.txt", "content": "x"}, workspace)
    assert written["path"] == "a/c.txt"
    assert call("read_file", {"path": "a/./c.txt"}, workspace)["path"] == "a/c.txt"


def test_write_replaces_atomically_and_leaves_no_temp_file(workspace: Path) -> None:
    call("write_file", {"path": "a.txt", "content": "old"}, workspace)
    call("write_file", {"path": "a.txt", "content": "new"}, workspace)
    assert (workspace / "a.txt").read_text() == "new"
    assert sorted(p.name for p in workspace.iterdir()) == ["a.txt"]


def test_write_without_overwrite_refuses_an_existing_file(workspace: Path) -> None:
    call("write_file", {"path": "a.txt", "content": "first", "overwrite": False}, workspace)
    with pytest.raises(ActionError, match=r"file exists: a\.txt") as info:
        call("write_file", {"path": "a.txt", "content": "second", "overwrite": False}, workspace)
    assert info.value.kind is ErrorKind.permanent
    assert (workspace / "a.txt").read_text() == "first"
    assert sorted(p.name for p in workspace.iterdir()) == ["a.txt"]


def test_write_onto_a_directory_is_permanent(workspace: Path) -> None:
    (workspace / "d").mkdir()
    with pytest.raises(ActionError, match="is a directory: d") as info:
        call("write_file", {"path": "d", "content": "x"}, workspace)
    assert info.value.kind is ErrorKind.permanent


def test_read_missing_file_is_permanent(workspace: Path) -> None:
    with pytest.raises(ActionError, match=r"^no such file: nope\.txt$") as info:
        call("read_file", {"path": "nope.txt"}, workspace)
    assert info.value.kind is ErrorKind.permanent
    with pytest.raises(ActionError, match=r"^no such file: no/such/dir\.txt$"):
        call("read_file", {"path": "no/such/dir.txt"}, workspace)


def test_read_refuses_large_and_binary_files(workspace: Path) -> None:
    (workspace / "big.txt").write_bytes(b"a" * (1024 * 1024 + 1))
    (workspace / "max.txt").write_bytes(b"a" * (1024 * 1024))
    (workspace / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ActionError, match=r"file too large: big\.txt"):
        call("read_file", {"path": "big.txt"}, workspace)
    assert call("read_file", {"path": "max.txt"}, workspace)["bytes"] == 1024 * 1024
    with pytest.raises(ActionError, match="not UTF-8 text: bin"):
        call("read_file", {"path": "bin"}, workspace)


def test_read_and_delete_refuse_a_directory(workspace: Path) -> None:
    (workspace / "d").mkdir()
    with pytest.raises(ActionError, match=r"^not a file: d$"):
        call("read_file", {"path": "d"}, workspace)
    with pytest.raises(ActionError, match="is a directory: d") as info:
        call("delete_file", {"path": "d"}, workspace)
    assert info.value.kind is ErrorKind.permanent
    assert (workspace / "d").is_dir()


def test_a_file_on_the_way_is_not_a_directory(workspace: Path) -> None:
    (workspace / "f").write_text("x")
    for tool in FILE_TOOLS:
        raw = {"path": "f/a.txt", "content": "x"} if tool == "write_file" else {"path": "f/a.txt"}
        with pytest.raises(ActionError, match=re.escape("path 'f/a.txt': f is not a directory")):
            call(tool, raw, workspace)


@pytest.fixture
def outside(workspace: Path) -> Path:
    """A file next to the workspace that no tool may touch."""
    path = workspace.parent / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("secret")
    return path


@pytest.mark.parametrize("tool", FILE_TOOLS)
@pytest.mark.parametrize("path", ["../outside/secret.txt", "a/../../outside/secret.txt"])
def test_dotdot_escape_is_rejected(tool: str, path: str, workspace: Path, outside: Path) -> None:
    raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
    with pytest.raises(InputRejected, match=re.escape(f"path '{path}' is outside the workspace")):
        call(tool, raw, workspace)
    assert outside.read_text() == "secret"


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_absolute_path_is_rejected(tool: str, workspace: Path, outside: Path) -> None:
    for path in ("/etc/passwd", str(outside), str(workspace / "inside.txt")):
        raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
        with pytest.raises(
            InputRejected, match=re.escape(f"path '{path}' is outside the workspace")
        ):
            call(tool, raw, workspace)
    assert outside.read_text() == "secret"


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_symlinks_out_of_the_workspace_are_refused(
    tool: str, workspace: Path, outside: Path
) -> None:
    (workspace / "link.txt").symlink_to(outside)
    (workspace / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    (workspace / "dangling").symlink_to(outside.parent / "new.txt")
    for path, where in [
        ("link.txt", "link.txt"),
        ("linkdir/secret.txt", "linkdir"),
        ("linkdir/new.txt", "linkdir"),
        ("dangling", "dangling"),
    ]:
        raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
        with pytest.raises(
            ActionError,
            match=re.escape(f"path '{path}' goes through a symbolic link ({where}): refused"),
        ) as info:
            call(tool, raw, workspace)
        assert info.value.kind is ErrorKind.permanent
    assert outside.read_text() == "secret"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["secret.txt"]
    assert (workspace / "link.txt").is_symlink()  # not even the link itself is removed


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_symlinks_inside_the_workspace_are_refused_too(tool: str, workspace: Path) -> None:
    """A behaviour change: the path-based tools followed a symlink that stayed inside."""
    (workspace / "real").mkdir()
    (workspace / "real" / "a.txt").write_text("real")
    (workspace / "alias").symlink_to(workspace / "real", target_is_directory=True)
    (workspace / "a-link.txt").symlink_to("real/a.txt")
    for path, where in [("alias/a.txt", "alias"), ("a-link.txt", "a-link.txt")]:
        raw = {"path": path, "content": "x"} if tool == "write_file" else {"path": path}
        with pytest.raises(
            ActionError,
            match=re.escape(f"path '{path}' goes through a symbolic link ({where}): refused"),
        ):
            call(tool, raw, workspace)
    assert (workspace / "real" / "a.txt").read_text() == "real"
    assert (workspace / "a-link.txt").is_symlink()


def test_the_workspace_itself_is_not_a_file(workspace: Path) -> None:
    for path in (".", "a/.."):
        with pytest.raises(InputRejected, match="is the workspace itself"):
            call("delete_file", {"path": path}, workspace)
    with pytest.raises(InputRejected, match="path: String should have at least 1 character"):
        call("read_file", {"path": ""}, workspace)


def test_resolve_in_workspace_is_lexical(workspace: Path) -> None:
    assert resolve_in_workspace(workspace, "a/./b/../c") == workspace.resolve() / "a" / "c"
    assert workspace_parts("a//b/./c/") == ("a", "b", "c")
    assert workspace_parts("a/..") == ()
    with pytest.raises(InputRejected, match="NUL byte"):
        resolve_in_workspace(workspace, "a\0b")
    with pytest.raises(InputRejected, match="outside the workspace"):
        resolve_in_workspace(workspace, "a/../../b")
    # What is on disk does not matter here: the tools refuse the symlink when they run.
    os.symlink("loop", workspace / "loop")
    assert resolve_in_workspace(workspace, "loop/x") == workspace.resolve() / "loop" / "x"


def _in_thread(function: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Run `function` in a thread; fail (rather than hang) when it does not return in time."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"blocked for more than {timeout_s} s"
    return outcome[0]


def test_a_fifo_is_refused_without_blocking(workspace: Path) -> None:
    os.mkfifo(workspace / "fifo")
    error = _in_thread(lambda: call("read_file", {"path": "fifo"}, workspace))
    assert isinstance(error, ActionError)
    assert error.message == "not a regular file: fifo (a FIFO): refused"
    error = _in_thread(lambda: call("write_file", {"path": "fifo", "content": "x"}, workspace))
    assert isinstance(error, ActionError)
    assert error.message == "not a regular file: fifo (a FIFO): refused"
    assert stat.S_ISFIFO((workspace / "fifo").lstat().st_mode)
    # Removing the name opens nothing: a FIFO can be deleted.
    assert call("delete_file", {"path": "fifo"}, workspace)["deleted"] is True


def test_a_fifo_swapped_in_after_the_look_is_refused_by_fstat(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workspace / "f").write_text("plain")
    os.mkfifo(workspace / "fifo")
    # By descriptor, as a command in the workspace would: the swap runs with the tool's identity.
    fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    try:
        swap_after_lstat(monkeypatch, "f", lambda: exchange("f", "fifo", dir_fd=fd))
        error = _in_thread(lambda: call("read_file", {"path": "f"}, workspace))
    finally:
        os.close(fd)
    assert isinstance(error, ActionError)
    assert error.message == "not a regular file: f (a FIFO): refused"


def test_a_hard_link_the_workspace_user_owns_is_read(workspace: Path) -> None:
    (workspace / "a.txt").write_text("mine")
    give(workspace / "a.txt")
    os.link(workspace / "a.txt", workspace / "b.txt")
    assert call("read_file", {"path": "b.txt"}, workspace)["content"] == "mine"


@needs_root
def test_a_hard_link_to_a_file_of_another_user_is_refused(workspace: Path, outside: Path) -> None:
    # Readable by anyone (0644), so only the hard-link rule stands in the way.
    outside.chmod(0o644)
    os.link(outside, workspace / "hl.txt")
    with pytest.raises(
        ActionError, match=r"^hl\.txt has 2 hard links and nobody does not own it: refused$"
    ):
        call("read_file", {"path": "hl.txt"}, workspace)
    # Replacing or removing the name never touches the linked file.
    call("write_file", {"path": "hl.txt", "content": "new"}, workspace)
    assert outside.read_text() == "secret"
    assert call("delete_file", {"path": "hl.txt"}, workspace)["deleted"] is True
    assert outside.read_text() == "secret"


# --- races -----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: Path | str, b: Path | str, dir_fd: int = AT_FDCWD) -> None:
    """Swap two names atomically: `renameat2(RENAME_EXCHANGE)`, as an agent's command can."""
    if not hasattr(_libc, "renameat2"):
        pytest.skip("renameat2 is not available in this C library")
    if _libc.renameat2(dir_fd, os.fsencode(a), dir_fd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def swap_after_lstat(monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[], None]) -> None:
    """Swap once, right after the tools look at `name` and before they open or remove it."""
    real = ws._lstat
    done: list[bool] = []

    def looked(dir_fd: int, looked_at: str) -> os.stat_result | None:
        found = real(dir_fd, looked_at)
        if looked_at == name and not done:
            done.append(True)
            swap()
        return found

    monkeypatch.setattr(ws, "_lstat", looked)


@dataclass
class Attack:
    """A workspace an agent's command prepared, and what lies outside it.

    `race/sub` is a real folder with decoys; `race/link` a symlink to `outside`, which holds a
    0600 secret and a victim, in a directory only its owner (root, in CI) may write. The swaps go
    by descriptors of `race` and of the real folder, as a command working in the workspace does
    (at the tools' hook they run with the tools' identity, which cannot walk the pytest tree).
    """

    workspace: Path
    outside: Path
    race_fd: int = -1
    sub_fd: int = -1

    @property
    def sub(self) -> Path:
        return self.workspace / "race" / "sub"

    @property
    def link(self) -> Path:
        return self.workspace / "race" / "link"

    @property
    def secret(self) -> Path:
        return self.outside / "secret.txt"

    @property
    def victim(self) -> Path:
        return self.outside / "victim.txt"

    def swap(self) -> None:
        exchange("sub", "link", dir_fd=self.race_fd)

    def assert_untouched(self) -> None:
        assert sorted(p.name for p in self.outside.iterdir()) == ["secret.txt", "victim.txt"]
        assert self.secret.read_text() == SECRET
        assert self.victim.read_text() == "victim"
        assert stat.S_IMODE(self.secret.stat().st_mode) == 0o600


@pytest.fixture
def attack(workspace: Path) -> Iterator[Attack]:
    # Outside the pytest tree (whose root is private to its user), so that only the modes of the
    # targets themselves stand in the workspace user's way.
    made = Attack(workspace, Path(tempfile.mkdtemp(prefix="outside-")))
    try:
        made.outside.chmod(0o755)
        made.secret.write_text(SECRET)
        made.secret.chmod(0o600)
        made.victim.write_text("victim")
        made.sub.mkdir(parents=True)
        (made.sub / "secret.txt").write_text(DECOY)
        (made.sub / "victim.txt").write_text(DECOY)
        made.link.symlink_to(made.outside, target_is_directory=True)
        give(made.sub.parent, made.sub, made.sub / "secret.txt", made.sub / "victim.txt", made.link)
        made.race_fd = os.open(made.sub.parent, os.O_RDONLY | os.O_DIRECTORY)
        made.sub_fd = os.open(made.sub, os.O_RDONLY | os.O_DIRECTORY)
        yield made
    finally:
        for fd in (made.race_fd, made.sub_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(made.outside)


ATTACK_INPUTS = {
    "read_file": {"path": "race/sub/secret.txt"},
    "write_file": {"path": "race/sub/new.txt", "content": "pwned"},
    "delete_file": {"path": "race/sub/victim.txt"},
}


def path_based(tool: str, workspace: Path, relative: str) -> Any:
    """The file tools as they were: resolve and check the path, then use the path."""
    root = workspace.resolve()
    target = (root / relative).resolve()
    assert target.is_relative_to(root), "the check"
    ws.before_use(relative)  # their gap
    if tool == "read_file":
        return target.read_text()
    if tool == "write_file":
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / ".tmp"
        temp.write_text("pwned")
        os.replace(temp, target)
        return None
    target.unlink()
    return None


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_the_path_based_tools_escaped_a_folder_swapped_between_check_and_use(
    tool: str, attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported attack, made deterministic: what the fix is for."""
    monkeypatch.setattr(ws, "before_use", lambda relative: attack.swap())
    got = path_based(tool, attack.workspace, ATTACK_INPUTS[tool]["path"])
    if tool == "read_file":
        assert got == SECRET
    elif tool == "write_file":
        assert (attack.outside / "new.txt").read_text() == "pwned"
    else:
        assert not attack.victim.exists()


def swap_at_hook(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None]) -> list[str]:
    seen: list[str] = []

    def hook(relative: str) -> None:
        seen.append(relative)
        swap()

    monkeypatch.setattr(ws, "before_use", hook)
    return seen


def assert_stayed_inside(tool: str, attack: Attack, result: dict[str, Any]) -> None:
    """The tool acted on the folder it walked, which now has the link's name: still inside."""
    walked = attack.link  # the real folder, swapped to this name
    assert walked.is_dir()
    assert not walked.is_symlink()
    if tool == "read_file":
        assert result["content"] == DECOY
    elif tool == "write_file":
        assert (walked / "new.txt").read_text() == "pwned"
    else:
        assert result["deleted"] is True
        assert not (walked / "victim.txt").exists()


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_a_folder_swapped_for_a_symlink_between_walk_and_use_gains_nothing(
    tool: str, attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = swap_at_hook(monkeypatch, attack.swap)
    result = call(tool, ATTACK_INPUTS[tool], attack.workspace)
    assert seen == [ATTACK_INPUTS[tool]["path"]]
    assert attack.sub.is_symlink()  # the swap happened
    assert_stayed_inside(tool, attack, result)
    attack.assert_untouched()


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_the_walk_alone_holds_for_a_root_worker(
    tool: str, attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the identity switch (the worker taken for an ordinary user), the walk keeps a
    root worker inside: as root, it is the only layer left."""
    monkeypatch.setattr(ws, "workspace_user", lambda env: ws.WorkspaceUser(0, 0, "root", False))
    swap_at_hook(monkeypatch, attack.swap)
    result = call(tool, ATTACK_INPUTS[tool], attack.workspace)
    assert_stayed_inside(tool, attack, result)
    attack.assert_untouched()
    # The symlink now in place of race/sub is refused.
    with pytest.raises(ActionError, match=r"goes through a symbolic link \(race/sub\): refused"):
        call(tool, ATTACK_INPUTS[tool], attack.workspace)
    attack.assert_untouched()


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_the_file_itself_swapped_for_a_symlink_after_the_look_is_refused_or_harmless(
    tool: str, attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the tools' look at the last component and their use of it: `O_NOFOLLOW` refuses
    to read through it, a rename replaces the link itself, an unlink removes the link itself."""
    name = "secret.txt" if tool == "read_file" else "victim.txt"
    lure = attack.sub / f"{name}.lnk"
    lure.symlink_to(attack.outside / name)
    give(lure)
    swap_after_lstat(monkeypatch, name, lambda: exchange(name, lure.name, dir_fd=attack.sub_fd))
    path = f"race/sub/{name}"
    if tool == "read_file":
        with pytest.raises(
            ActionError, match=re.escape(f"path '{path}' goes through a symbolic link ({path})")
        ):
            call(tool, {"path": path}, attack.workspace)
    elif tool == "write_file":
        call(tool, {"path": path, "content": "written"}, attack.workspace)
        assert (attack.sub / name).read_text() == "written"
        assert not (attack.sub / name).is_symlink()
    else:
        assert call(tool, {"path": path}, attack.workspace)["deleted"] is True
        assert (attack.sub / f"{name}.lnk").read_text() == DECOY  # the real file, kept
    attack.assert_untouched()


NAMES = re.compile(r"'.*?'|\(.*?\)")
"""Paths and the like in a reason, folded to count reasons."""


def _race(attack: Attack, duration_s: float) -> tuple[Counter[str], int]:
    """Swap `race/sub` and `race/link`, and the decoy secret and a link to the real one, in a
    loop in another thread, while the three tools run in this one; their outcomes, and swaps."""
    (attack.sub / "secret.lnk").symlink_to(attack.secret)
    give(attack.sub / "secret.lnk")
    stop = threading.Event()
    swaps = [0]
    failures: list[BaseException] = []

    def swapper() -> None:
        try:
            while not stop.is_set():
                attack.swap()
                exchange("secret.txt", "secret.lnk", dir_fd=attack.sub_fd)
                swaps[0] += 1
        except BaseException as exc:
            failures.append(exc)

    outcomes: Counter[str] = Counter()
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            for tool, raw in [
                ("read_file", {"path": "race/sub/secret.txt"}),
                ("write_file", {"path": "race/sub/victim.txt", "content": DECOY}),
                ("delete_file", {"path": "race/sub/victim.txt"}),
            ]:
                try:
                    result = call(tool, raw, attack.workspace)
                except ActionError as exc:
                    outcomes[f"{tool}: {re.sub(NAMES, '_', exc.message)}"] += 1
                    continue
                if tool == "read_file":
                    assert result["content"] != SECRET, "read the secret outside the workspace"
                    outcomes[f"read_file: {result['content']}"] += 1
                else:
                    outcomes[f"{tool}: ok"] += 1
    finally:
        stop.set()
        thread.join(10)
    assert not failures, failures
    return outcomes, swaps[0]


@pytest.mark.parametrize("layers", ["walk and identity", "walk alone"])
def test_a_bounded_race_never_leaves_the_workspace(
    layers: str, attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    if layers == "walk alone":
        monkeypatch.setattr(
            ws, "workspace_user", lambda env: ws.WorkspaceUser(*workspace_owner(), "me", False)
        )
    elif not AS_ROOT:
        pytest.skip("needs root (CI runs as root): the identity switch applies to a root worker")
    outcomes, swaps = _race(attack, duration_s=2.5)
    print(f"\n{swaps} swaps; outcomes: {dict(outcomes)}")
    attack.assert_untouched()
    assert swaps > 50
    assert outcomes[f"read_file: {DECOY}"] > 0
    assert outcomes["read_file: path _ goes through a symbolic link _: refused"] > 0
    assert outcomes["write_file: ok"] > 0
    if AS_ROOT:
        assert ws.fs_ids() == (0, 0)  # nothing leaked into this thread


# --- the workspace user's identity (root workers) ----------------------------------------------


@needs_root
def test_the_identity_alone_holds_where_the_walk_would_follow_a_symlink(
    attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk made to follow symlinks still reaches only what `nobody` may: the second layer."""
    monkeypatch.setattr(ws, "_DIR_FLAGS", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    monkeypatch.setattr(ws, "_READ_FLAGS", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def following(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return None

    monkeypatch.setattr(ws, "_lstat", following)
    for tool, verb in [("read_file", "read"), ("write_file", "write"), ("delete_file", "delete")]:
        raw = {**ATTACK_INPUTS[tool], "path": ATTACK_INPUTS[tool]["path"].replace("sub", "link")}
        with pytest.raises(
            ActionError, match=re.escape(f"cannot {verb} {raw['path']}: Permission denied")
        ):
            call(tool, raw, attack.workspace)
    attack.assert_untouched()


@needs_root
def test_as_user_switches_this_thread_only_and_always_back(attack: Attack) -> None:
    user = ws.workspace_user(ToolEnv(workspace=attack.workspace))
    assert (user.uid, user.gid, user.name, user.switch) == (*workspace_owner(), "nobody", True)
    inside = threading.Event()
    leave = threading.Event()
    seen: list[tuple[int, int]] = []

    def other() -> None:
        with ws.as_user(user):
            seen.append(ws.fs_ids())
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(5)
        assert ws.fs_ids() == (0, 0)  # this thread is still root meanwhile
        assert attack.secret.read_text() == SECRET
    finally:
        leave.set()
        thread.join(5)
    assert seen == [(user.uid, user.gid)]

    def as_nobody() -> None:
        with ws.as_user(user):
            assert ws.fs_ids() == (user.uid, user.gid)
            with pytest.raises(PermissionError):
                attack.secret.read_text()
            with pytest.raises(PermissionError):
                (attack.outside / "new.txt").write_text("x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        as_nobody()
    assert ws.fs_ids() == (0, 0)
    attack.assert_untouched()


@needs_root
def test_as_user_drops_the_supplementary_groups_of_its_thread_only() -> None:
    # In a process of its own: setgroups() changes every thread of the test process.
    code = (
        "import os, threading\n"
        "from workers.tools import workspace as ws\n"
        "os.setgroups([0, 4242])\n"
        "user = ws.WorkspaceUser(65534, 65534, 'nobody', True)\n"
        "seen, go, done = [], threading.Event(), threading.Event()\n"
        "def other():\n"
        "    go.wait(5); seen.append(os.getgroups()); done.set()\n"
        "threading.Thread(target=other).start()\n"
        "with ws.as_user(user):\n"
        "    seen.append(os.getgroups())\n"
        "    go.set(); done.wait(5)\n"
        "seen.append(os.getgroups())\n"
        "print(seen)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    # Inside: none; another thread meanwhile: the process's groups; after: back.
    assert out.strip() == "[[], [0, 4242], [0, 4242]]"


@needs_root
def test_a_root_worker_writes_as_the_workspace_user(workspace: Path) -> None:
    call("write_file", {"path": "d/a.txt", "content": "x"}, workspace)
    uid, gid = workspace_owner()
    for path in (workspace, workspace / "d", workspace / "d" / "a.txt"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid)
    # A file only root may read, in the workspace, is not read either.
    (workspace / "root-only.txt").write_text("r")
    (workspace / "root-only.txt").chmod(0o600)
    with pytest.raises(ActionError, match=r"cannot read root-only\.txt: Permission denied"):
        call("read_file", {"path": "root-only.txt"}, workspace)


@needs_root
def test_a_root_worker_refuses_a_missing_unknown_or_root_shell_user(workspace: Path) -> None:
    for shell_user, reason in [
        (None, "no shell_user is configured: refusing to touch the workspace as root"),
        ("no-such-user-xyz", "shell_user 'no-such-user-xyz' does not exist"),
        ("root", "shell_user 'root' is root: it must be unprivileged"),
    ]:
        for tool in FILE_TOOLS:
            raw = {"path": "a.txt", "content": "x"} if tool == "write_file" else {"path": "a.txt"}
            with pytest.raises(ActionError, match=re.escape(reason)):
                call(tool, raw, workspace, shell_user=shell_user)
    assert list(workspace.iterdir()) == []
