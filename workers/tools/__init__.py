"""The example tools, each a plain function with a pydantic input model, and their registry.

`TOOLS` maps a tool name to its `ToolSpec`; the Celery glue looks a tool up here, calls
`validate_input` (a rejection is a denial) and then `spec.run`.
"""

from __future__ import annotations

from typing import Any

from workers.tools import delete_file, echo, http_get, read_file, shell, write_file
from workers.tools.base import (
    InputRejected,
    ToolEnv,
    ToolSpec,
    resolve_in_workspace,
    validate_input,
)

TOOLS: dict[str, ToolSpec[Any]] = {
    spec.name: spec
    for spec in (
        echo.SPEC,
        http_get.SPEC,
        read_file.SPEC,
        write_file.SPEC,
        delete_file.SPEC,
        shell.SPEC,
    )
}
"""Every tool of this deployment, by name."""

__all__ = [
    "TOOLS",
    "InputRejected",
    "ToolEnv",
    "ToolSpec",
    "resolve_in_workspace",
    "validate_input",
]
