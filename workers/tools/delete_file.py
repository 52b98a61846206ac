"""`delete_file`: deletes one file of the workspace; a missing file is not an error."""

from __future__ import annotations

from typing import Any

from workers.tools import workspace
from workers.tools.base import (
    ToolEnv,
    ToolInput,
    ToolSpec,
    WorkspacePath,
    check_file_path,
)


class DeleteFileInput(ToolInput):
    """The file to delete, relative to the workspace."""

    path: WorkspacePath


def run(inp: DeleteFileInput, env: ToolEnv) -> dict[str, Any]:
    """Delete the file; `deleted` is false when there was nothing to delete.

    It removes the name relative to its directory's descriptor (`workers.tools.workspace`), so
    nothing outside the workspace can be reached. Directories are refused (removing a tree is a
    different, far more destructive action), and so are symlinks, in the path or as the file
    itself: the path-based tool before this deleted the file a symlink inside the workspace
    pointed to; this one neither follows it nor silently removes the link instead.
    """
    shown, deleted = workspace.delete_file(env, inp.path)
    return {"path": shown, "deleted": deleted}


SPEC = ToolSpec(
    name="delete_file",
    side_effect_class="fs.delete",
    input_model=DeleteFileInput,
    run=run,
    check=check_file_path,
    description="Delete a file from the workspace (not a directory); a missing file is no error.",
)
