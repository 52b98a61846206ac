"""`read_file`, `write_file` and `delete_file` on a real directory, and the workspace boundary."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from workers.tools import TOOLS, InputRejected, ToolEnv, resolve_in_workspace, validate_input


def call(tool: str, raw: dict[str, Any], workspace: Path) -> dict[str, Any]:
    """Validate and run a tool the way the Celery glue does."""
    env = ToolEnv(workspace=workspace)
    spec = TOOLS[tool]
    return spec.run(validate_input(spec, raw, env), env)


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


def test_read_refuses_large_and_binary_files(workspace: Path) -> None:
    (workspace / "big.txt").write_bytes(b"a" * (1024 * 1024 + 1))
    (workspace / "max.txt").write_bytes(b"a" * (1024 * 1024))
    (workspace / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ActionError, match=r"file too large: big\.txt"):
        call("read_file", {"path": "big.txt"}, workspace)
    assert call("read_file", {"path": "max.txt"}, workspace)["bytes"] == 1024 * 1024
    with pytest.raises(ActionError, match="not UTF-8 text: bin"):
        call("read_file", {"path": "bin"}, workspace)


def test_delete_refuses_a_directory(workspace: Path) -> None:
    (workspace / "d").mkdir()
    with pytest.raises(ActionError, match="is a directory: d") as info:
        call("delete_file", {"path": "d"}, workspace)
    assert info.value.kind is ErrorKind.permanent
    assert (workspace / "d").is_dir()


@pytest.fixture
def outside(workspace: Path) -> Path:
    """A file next to the workspace that no tool may touch."""
    path = workspace.parent / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("secret")
    return path


@pytest.mark.parametrize("tool", ["read_file", "write_file", "delete_file"])
@pytest.mark.parametrize("path", ["../outside/secret.txt", "a/../../outside/secret.txt"])
def test_dotdot_escape_is_rejected(tool: str, path: str, workspace: Path, outside: Path) -> None:
    raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
    with pytest.raises(InputRejected, match=re.escape(f"path '{path}' is outside the workspace")):
        call(tool, raw, workspace)
    assert outside.read_text() == "secret"


@pytest.mark.parametrize("tool", ["read_file", "write_file", "delete_file"])
def test_absolute_path_is_rejected(tool: str, workspace: Path, outside: Path) -> None:
    for path in ("/etc/passwd", str(outside), str(workspace / "inside.txt")):
        raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
        with pytest.raises(
            InputRejected, match=re.escape(f"path '{path}' is outside the workspace")
        ):
            call(tool, raw, workspace)
    assert outside.read_text() == "secret"


@pytest.mark.parametrize("tool", ["read_file", "write_file", "delete_file"])
def test_symlinks_out_of_the_workspace_are_rejected(
    tool: str, workspace: Path, outside: Path
) -> None:
    (workspace / "link.txt").symlink_to(outside)
    (workspace / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    (workspace / "dangling").symlink_to(outside.parent / "new.txt")
    for path in ("link.txt", "linkdir/secret.txt", "linkdir/new.txt", "dangling"):
        raw = {"path": path, "content": "pwned"} if tool == "write_file" else {"path": path}
        with pytest.raises(
            InputRejected, match=re.escape(f"path '{path}' is outside the workspace")
        ):
            call(tool, raw, workspace)
    assert outside.read_text() == "secret"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["secret.txt"]


def test_symlinks_inside_the_workspace_are_followed(workspace: Path) -> None:
    (workspace / "real").mkdir()
    (workspace / "alias").symlink_to(workspace / "real", target_is_directory=True)
    result = call("write_file", {"path": "alias/a.txt", "content": "x"}, workspace)
    assert result["path"] == "real/a.txt"
    assert (workspace / "real" / "a.txt").read_text() == "x"


def test_the_workspace_itself_is_not_a_file(workspace: Path) -> None:
    for path in (".", "a/.."):
        with pytest.raises(InputRejected, match="is the workspace itself"):
            call("delete_file", {"path": path}, workspace)
    with pytest.raises(InputRejected, match="path: String should have at least 1 character"):
        call("read_file", {"path": ""}, workspace)


def test_resolve_in_workspace(workspace: Path) -> None:
    assert resolve_in_workspace(workspace, "a/./b/../c") == workspace.resolve() / "a" / "c"
    with pytest.raises(InputRejected, match="NUL byte"):
        resolve_in_workspace(workspace, "a\0b")
    os.symlink("loop", workspace / "loop")
    with pytest.raises(InputRejected, match="'loop/x'"):
        resolve_in_workspace(workspace, "loop/x")
