"""`read_file`: reads a UTF-8 text file of the workspace (at most 1 MiB)."""

from __future__ import annotations

from typing import Any

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

MAX_BYTES = 1024 * 1024
"""Larger files are refused: the content travels back through the result backend."""


class ReadFileInput(ToolInput):
    """The file to read, relative to the workspace."""

    path: WorkspacePath


def run(inp: ReadFileInput, env: ToolEnv) -> dict[str, Any]:
    """Read the file; a missing, oversized, non-text or unreadable file is a permanent failure."""
    # Resolved again here, not trusted from `check`: the tree may have changed in between.
    target = resolve_file_in_workspace(env.workspace, inp.path)
    try:
        with target.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ActionError.permanent(f"no such file: {inp.path}") from None
    except IsADirectoryError:
        raise ActionError.permanent(f"not a file: {inp.path}") from None
    except OSError as exc:
        raise ActionError.permanent(f"cannot read {inp.path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_BYTES:
        raise ActionError.permanent(f"file too large: {inp.path} is over {MAX_BYTES} bytes")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ActionError.permanent(f"not UTF-8 text: {inp.path}") from None
    return {
        "path": workspace_relative(env.workspace, target),
        "content": content,
        "bytes": len(data),
    }


SPEC = ToolSpec(
    name="read_file",
    side_effect_class="fs.read",
    input_model=ReadFileInput,
    run=run,
    check=check_file_path,
    description="Read a UTF-8 text file (at most 1 MiB) from the workspace.",
)
