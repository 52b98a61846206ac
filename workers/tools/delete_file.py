"""`delete_file`: deletes one file of the workspace; a missing file is not an error."""

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


class DeleteFileInput(ToolInput):
    """The file to delete, relative to the workspace."""

    path: WorkspacePath


def run(inp: DeleteFileInput, env: ToolEnv) -> dict[str, Any]:
    """Delete the file; `deleted` is false when there was nothing to delete.

    Like the other file tools it acts on the resolved path, so a symlink (which can only point
    inside the workspace, or `check` rejects it) deletes the file it points to. Directories are
    refused: removing a tree is a different, far more destructive action.
    """
    target = resolve_file_in_workspace(env.workspace, inp.path)
    if target.is_dir():
        raise ActionError.permanent(f"is a directory: {inp.path}")
    try:
        target.unlink()
    except FileNotFoundError:
        deleted = False
    except OSError as exc:
        raise ActionError.permanent(f"cannot delete {inp.path}: {exc.strerror or exc}") from exc
    else:
        deleted = True
    return {"path": workspace_relative(env.workspace, target), "deleted": deleted}


SPEC = ToolSpec(
    name="delete_file",
    side_effect_class="fs.delete",
    input_model=DeleteFileInput,
    run=run,
    check=check_file_path,
    description="Delete a file from the workspace (not a directory); a missing file is no error.",
)
