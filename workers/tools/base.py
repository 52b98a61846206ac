"""What a tool is (input model, pre-run check, run function) and the rule that confines file paths.

Tools are plain functions so that they can be tested without Celery; the Celery glue validates the
input with `validate_input` (a rejection becomes an authorization denial, so the tool never runs)
and then calls `spec.run`. Failures while running are raised as classified `ActionError`s.
"""

from __future__ import annotations

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
    "resolve_file_in_workspace",
    "resolve_in_workspace",
    "validate_input",
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
    `shell_isolate_network` whether it cuts the command's network (when the kernel allows).
    """

    workspace: Path
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    http_timeout_s: float = 10.0
    shell_timeout_s: float = 30.0
    shell_user: str | None = "nobody"
    shell_limits: ShellLimits = field(default_factory=ShellLimits)
    shell_isolate_network: bool = True


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


def resolve_in_workspace(workspace: Path, relative: str) -> Path:
    """The absolute, symlink-free path of `relative` inside `workspace`, or `InputRejected`.

    Rejects absolute paths, `..` escapes and symlinks that resolve outside the workspace. A symlink
    whose target is missing is still followed, so writing through it cannot escape either.
    """
    if "\0" in relative:
        raise InputRejected(f"path {relative!r} contains a NUL byte")
    if Path(relative).is_absolute():
        raise InputRejected(
            f"path {relative!r} is outside the workspace (paths are relative to the workspace)"
        )
    try:
        root = workspace.resolve()
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise InputRejected(f"path {relative!r} cannot be resolved: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise InputRejected(f"path {relative!r} is outside the workspace")
    return resolved


def resolve_file_in_workspace(workspace: Path, relative: str) -> Path:
    """Like `resolve_in_workspace`, but the workspace directory itself is not a file path."""
    resolved = resolve_in_workspace(workspace, relative)
    if resolved == workspace.resolve():
        raise InputRejected(f"path {relative!r} is the workspace itself, not a file")
    return resolved


class PathInput(Protocol):
    """An input naming one file of the workspace."""

    @property
    def path(self) -> str: ...


def check_file_path(inp: PathInput, env: ToolEnv) -> None:
    """The `check` of every file tool: the path must name a file inside the workspace."""
    resolve_file_in_workspace(env.workspace, inp.path)


def workspace_relative(workspace: Path, resolved: Path) -> str:
    """The POSIX path of `resolved` relative to the workspace, as tools report it back."""
    return resolved.relative_to(workspace.resolve()).as_posix()
