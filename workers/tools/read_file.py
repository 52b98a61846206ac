"""`read_file`: reads a UTF-8 text file of the workspace (at most 1 MiB).

The file is reached through descriptors from the workspace (`workers.tools.workspace`): a symlink
anywhere in the path is refused, even one pointing inside the workspace; only a regular file is
read (a FIFO, socket or device is refused without blocking); a file with several hard links that
the workspace's user does not own is refused; and a root worker reads as that user.
"""

from __future__ import annotations

from typing import Any

from governance.policy.errors import ActionError
from workers.tools import workspace
from workers.tools.base import (
    ToolEnv,
    ToolInput,
    ToolSpec,
    WorkspacePath,
    check_file_path,
)

MAX_BYTES = 1024 * 1024
"""Larger files are refused: the content travels back through the result backend."""


class ReadFileInput(ToolInput):
    """The file to read, relative to the workspace."""

    path: WorkspacePath


def run(inp: ReadFileInput, env: ToolEnv) -> dict[str, Any]:
    """Read the file; a missing, oversized, non-text, unreadable or refused file is a permanent
    failure."""
    shown, data = workspace.read_file(env, inp.path, MAX_BYTES)
    if len(data) > MAX_BYTES:
        raise ActionError.permanent(f"file too large: {inp.path} is over {MAX_BYTES} bytes")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ActionError.permanent(f"not UTF-8 text: {inp.path}") from None
    return {"path": shown, "content": content, "bytes": len(data)}


SPEC = ToolSpec(
    name="read_file",
    side_effect_class="fs.read",
    input_model=ReadFileInput,
    run=run,
    check=check_file_path,
    description="Read a UTF-8 text file (at most 1 MiB) from the workspace.",
)
