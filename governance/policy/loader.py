"""Reading the policy file: YAML to validated models, with errors that name file, field and reason.

Every problem is reported at once, one line each as "<file>: <field.path>: <reason>", so a broken
config is fixed in one pass. Duplicate keys in the YAML are an error rather than last-one-wins:
a second `acme:` under `tenants` silently replacing the first is not something to deploy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from governance.policy.checks import Problem
from governance.policy.config import GovernanceConfig

DICT_SOURCE = "<dict>"


class ConfigError(Exception):
    """An invalid policy config: `source` is the file (or "<dict>"), `errors` (path, reason)s."""

    def __init__(self, source: str, errors: Sequence[Problem]) -> None:
        self.source = source
        self.errors: list[Problem] = list(errors)
        super().__init__(
            "\n".join(_line(source, path, reason) for path, reason in self.errors)
            or f"{source}: invalid configuration"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.source, self.errors))


def _line(source: str, path: str, reason: str) -> str:
    return f"{source}: {path}: {reason}" if path else f"{source}: {reason}"


def loc_to_path(loc: Iterable[int | str]) -> str:
    """("tenants", "acme", "budgets", 1, "tokens") -> "tenants.acme.budgets[1].tokens"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _describe(error: Mapping[str, Any]) -> Problem:
    loc = list(error["loc"])
    reason = str(error["msg"])
    if reason.startswith("Value error, "):
        reason = reason[len("Value error, ") :]
    if loc and loc[-1] == "[key]":
        # pydantic reports an invalid mapping key as <path>.<key>.[key]
        loc.pop()
        reason = f"invalid name: {reason}"
    value = error.get("input")
    shows_value = error["type"] in {"enum", "literal_error", "extra_forbidden"} or (
        error["type"].endswith(("_type", "_parsing", "greater_than_equal", "less_than_equal"))
    )
    if shows_value and isinstance(value, str | int | float | bool) and value is not None:
        reason = f"{reason} (got {value!r})"
    return loc_to_path(loc), reason


def validation_problems(exc: ValidationError) -> list[Problem]:
    """The errors of a pydantic ValidationError as (dotted field path, reason) pairs."""
    return [_describe(err) for err in exc.errors(include_url=False)]


def parse_config(data: object, source: str = DICT_SOURCE) -> GovernanceConfig:
    """Validate a loaded mapping into a GovernanceConfig, or raise ConfigError."""
    if not isinstance(data, Mapping):
        kind = "nothing (empty file)" if data is None else type(data).__name__
        raise ConfigError(source, [("", f"the top level must be a mapping, got {kind}")])
    try:
        return GovernanceConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> object:
    """Parse YAML text; a syntax error becomes a ConfigError at "line:column" of the problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, str(problem))]) from None


def load_config(path: str | Path) -> GovernanceConfig:
    """Read and validate the YAML policy file at `path`, or raise ConfigError naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read the file: {exc}")]) from None
    return parse_config(load_yaml(text, source), source)
