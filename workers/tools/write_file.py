"""`write_file`: writes a UTF-8 text file in the workspace, atomically.

The content goes to a new temporary file next to the target, is flushed to disk, and then replaces
the target in one rename, so a reader never sees half a file and a crash leaves the old one. All
of it happens on descriptors from the workspace (`workers.tools.workspace`): missing directories
are made one by one, a symlink anywhere in the path (the target included) is refused, even one
pointing inside the workspace, and a root worker writes as the workspace's user.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from workers.tools import workspace
from workers.tools.base import (
    ToolEnv,
    ToolInput,
    ToolSpec,
    WorkspacePath,
    check_file_path,
)

MAX_CHARS = 1024 * 1024
"""Larger contents are refused: they travel through the broker as part of the task message."""


class WriteFileInput(ToolInput):
    """The file to write (relative to the workspace), its content, and whether to replace it."""

    path: WorkspacePath
    content: Annotated[str, Field(max_length=MAX_CHARS)]
    overwrite: bool = True


def run(inp: WriteFileInput, env: ToolEnv) -> dict[str, Any]:
    """Create missing parent directories, then write the file atomically.

    With `overwrite=False` an existing file is a permanent failure; the check and the write are
    one `link`, so two concurrent writers cannot both win. A directory, symlink or other
    non-regular file at the target is a permanent failure.
    """
    data = inp.content.encode("utf-8")
    shown = workspace.write_file(env, inp.path, data, inp.overwrite)
    return {"path": shown, "bytes": len(data)}


SPEC = ToolSpec(
    name="write_file",
    side_effect_class="fs.write",
    input_model=WriteFileInput,
    run=run,
    check=check_file_path,
    description="Write a UTF-8 text file in the workspace atomically, creating parent directories.",
)
