"""What a tool is (input model, pre-run check, run function) and the rule that confines file paths.

File paths are relative to the workspace and checked lexically here (no NUL, not absolute, no
`..` escape); the file tools then reach them only through descriptors, component by component,
refusing every symlink (`workers.tools.workspace`).

Tools are plain functions so that they can be tested without Celery; the Celery glue validates the
input with `validate_input` (a rejection becomes an authorization denial, so the tool never runs)
and then calls `spec.run`. Failures while running are raised as classified `ActionError`s.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.tools.netguard import IPNetwork
from workers.tools.sandbox import ShellLimits

__all__ = [
    "InputRejected",
    "ToolEnv",
    "ToolInput",
    "ToolSpec",
    "WorkspacePath",
    "file_parts",
    "resolve_file_in_workspace",
    "resolve_in_workspace",
    "validate_input",
    "workspace_parts",
    "workspace_relative",
]


class InputRejected(Exception):
    """The input of a tool call is not acceptable: invalid, outside the workspace, domain denied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class ToolEnv:
    """What a tool may use at run time, taken from the deployment and the tenant's policy.

    `workspace` is the only directory file tools and `shell` may touch; `allowed_domains` are the
    hosts (and their subdomains) that network tools may reach, none when empty, and
    `allowed_networks` the internal networks (loopback, private, ...) they may reach too, none
    when empty. `http_timeout_s` is one deadline for a whole request. `shell_user` is who `shell`
    runs commands as when the worker is root; `shell_limits` what one command may use;
    `shell_isolate_network` whether it cuts the command's network (when the kernel allows);
    `shell_best_effort` whether `shell` runs where the worker cannot contain a call of its own
    (`GOVERNANCE_SHELL_BEST_EFFORT`; otherwise it refuses).
    """

    workspace: Path
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    http_timeout_s: float = 10.0
    shell_timeout_s: float = 30.0
    shell_user: str | None = "nobody"
    shell_limits: ShellLimits = field(default_factory=ShellLimits)
    shell_isolate_network: bool = True
    shell_best_effort: bool = False


class ToolInput(BaseModel):
    """Base of every tool's input model: unknown fields are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


WorkspacePath = Annotated[str, Field(min_length=1, max_length=4096)]
"""A path relative to the workspace, as file tools take it."""

InputT = TypeVar("InputT", bound=BaseModel)


@dataclass(frozen=True)
class ToolSpec(Generic[InputT]):
    """A tool: its name, side-effect class, input model, pre-run check and run function.

    `check` raises `InputRejected` (it runs before any side effect, so a rejection is a denial);
    `run` returns a JSON-serializable dict or raises `ActionError`.
    """

    name: str
    side_effect_class: str
    input_model: type[InputT]
    run: Callable[[InputT, ToolEnv], dict[str, Any]]
    check: Callable[[InputT, ToolEnv], None]
    description: str

    def __post_init__(self) -> None:
        # Checked once at import time: a model that ignored unknown fields would let a typo
        # ("overwite": false) silently change what the tool does.
        if self.input_model.model_config.get("extra") != "forbid":
            raise TypeError(f"tool {self.name}: input model must set extra='forbid'")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
    return "; ".join(parts)


def validate_input(spec: ToolSpec[InputT], raw: Mapping[str, Any], env: ToolEnv) -> InputT:
    """Validate `raw` against the tool's input model, then run its check.

    Raises `InputRejected` with a reason naming the field, e.g.
    "invalid input for write_file: path: Field required".
    """
    try:
        value = spec.input_model.model_validate(raw)
    except ValidationError as exc:
        raise InputRejected(f"invalid input for {spec.name}: {_describe(exc)}") from exc
    spec.check(value, env)
    return value


def workspace_parts(relative: str) -> tuple[str, ...]:
    """The components of `relative` once `.` and `..` are folded, or `InputRejected`.

    Purely lexical: the tree is not looked at (the publisher may not even have the workspace).
    Rejects NUL bytes, absolute paths and `..` escapes; the workspace itself is `()`. Folding
    `a/../b` to `b` without looking is sound because the file tools refuse every symlink on the
    way (`workers.tools.workspace`), so `a/..` is always the directory holding `a`.
    """
    if "\0" in relative:
        raise InputRejected(f"path {relative!r} contains a NUL byte")
    if relative.startswith("/"):
        raise InputRejected(
            f"path {relative!r} is outside the workspace (paths are relative to the workspace)"
        )
    normal = posixpath.normpath(relative)
    if normal == ".":
        return ()
    parts = tuple(normal.split("/"))
    if parts[0] == "..":
        raise InputRejected(f"path {relative!r} is outside the workspace")
    return parts


def file_parts(relative: str) -> tuple[str, ...]:
    """Like `workspace_parts`, but the workspace directory itself is not a file path."""
    parts = workspace_parts(relative)
    if not parts:
        raise InputRejected(f"path {relative!r} is the workspace itself, not a file")
    return parts


def resolve_in_workspace(workspace: Path, relative: str) -> Path:
    """The absolute path `relative` names inside `workspace`, or `InputRejected`.

    Lexical (see `workspace_parts`): it says where a path points, not what is there. The file
    tools do not open this path: they walk it from a descriptor of the workspace, refusing any
    symlink on the way (`workers.tools.workspace`), so nothing that changes the tree between a
    check and the use can take them outside.
    """
    return workspace.resolve().joinpath(*workspace_parts(relative))


def resolve_file_in_workspace(workspace: Path, relative: str) -> Path:
    """Like `resolve_in_workspace`, but the workspace directory itself is not a file path."""
    return workspace.resolve().joinpath(*file_parts(relative))


class PathInput(Protocol):
    """An input naming one file of the workspace."""

    @property
    def path(self) -> str: ...


def check_file_path(inp: PathInput, env: ToolEnv) -> None:
    """The `check` of every file tool: the path must name a file inside the workspace.

    Lexical, so it gives the same answer on the publisher and on the worker; what is on disk
    (symlinks, file types) is decided when the tool runs, on descriptors.
    """
    file_parts(inp.path)


def workspace_relative(workspace: Path, resolved: Path) -> str:
    """The POSIX path of `resolved` relative to the workspace, as tools report it back."""
    return resolved.relative_to(workspace.resolve()).as_posix()
