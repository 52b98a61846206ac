"""`write_file`: writes a UTF-8 text file in the workspace, atomically.

The content goes to a temporary file next to the target, is flushed to disk, and then replaces the
target in one `os.replace`, so a reader never sees half a file and a crash leaves the old one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from governance.policy.errors import ActionError
from workers.tools.base import (
    ToolEnv,
    ToolInput,
    ToolSpec,
    WorkspacePath,
    check_file_path,
    resolve_file_in_workspace,
    workspace_relative,
)

MAX_CHARS = 1024 * 1024
"""Larger contents are refused: they travel through the broker as part of the task message."""


class WriteFileInput(ToolInput):
    """The file to write (relative to the workspace), its content, and whether to replace it."""

    path: WorkspacePath
    content: Annotated[str, Field(max_length=MAX_CHARS)]
    overwrite: bool = True


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
    temp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    # 0o666 with O_EXCL: the umask applies as for any new file, and no existing file is reused.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return temp


def run(inp: WriteFileInput, env: ToolEnv) -> dict[str, Any]:
    """Create missing parent directories, then write the file atomically.

    With `overwrite=False` an existing file is a permanent failure; the check and the write are
    one `os.link`, so two concurrent writers cannot both win.
    """
    target = resolve_file_in_workspace(env.workspace, inp.path)
    data = inp.content.encode("utf-8")
    if target.is_dir():
        raise ActionError.permanent(f"is a directory: {inp.path}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = _write_temp(target.parent, target.name, data)
        try:
            if inp.overwrite:
                os.replace(temp, target)
            else:
                os.link(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
    except FileExistsError:
        raise ActionError.permanent(f"file exists: {inp.path} (overwrite is false)") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot write {inp.path}: {exc.strerror or exc}") from exc
    return {"path": workspace_relative(env.workspace, target), "bytes": len(data)}


SPEC = ToolSpec(
    name="write_file",
    side_effect_class="fs.write",
    input_model=WriteFileInput,
    run=run,
    check=check_file_path,
    description="Write a UTF-8 text file in the workspace atomically, creating parent directories.",
)
