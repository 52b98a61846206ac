"""The tool contract: input validation, the registry, and `echo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from workers.tools import TOOLS, InputRejected, ToolEnv, ToolSpec, validate_input
from workers.tools.echo import EchoInput


def test_registry_names_and_side_effect_classes() -> None:
    assert {name: spec.side_effect_class for name, spec in TOOLS.items()} == {
        "echo": "compute",
        "http_get": "network.read",
        "read_file": "fs.read",
        "write_file": "fs.write",
        "delete_file": "fs.delete",
        "shell": "process.exec",
    }
    for name, spec in TOOLS.items():
        assert spec.name == name
        assert spec.description


def test_echo_returns_its_text(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace)
    spec = TOOLS["echo"]
    inp = validate_input(spec, {"text": "hello"}, env)
    assert isinstance(inp, EchoInput)
    result = spec.run(inp, env)
    assert result == {"text": "hello"}
    json.dumps(result)


def test_echo_text_is_limited(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace)
    validate_input(TOOLS["echo"], {"text": "x" * 10_000}, env)
    with pytest.raises(InputRejected, match=r"^invalid input for echo: text: String should have"):
        validate_input(TOOLS["echo"], {"text": "x" * 10_001}, env)


def test_missing_field_is_rejected_naming_it(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace)
    with pytest.raises(InputRejected) as info:
        validate_input(TOOLS["write_file"], {"content": "x"}, env)
    assert info.value.reason == "invalid input for write_file: path: Field required"


def test_unknown_field_is_rejected_naming_it(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace)
    raw = {"path": "a.txt", "content": "x", "overwite": False}
    with pytest.raises(InputRejected, match="overwite: Extra inputs are not permitted"):
        validate_input(TOOLS["write_file"], raw, env)


def test_wrong_type_is_rejected_naming_the_nested_field(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace)
    with pytest.raises(
        InputRejected, match=r"invalid input for shell: command\.1: Input should be"
    ):
        validate_input(TOOLS["shell"], {"command": ["echo", 3]}, env)
    with pytest.raises(InputRejected, match=r"command: List should have at least 1 item"):
        validate_input(TOOLS["shell"], {"command": []}, env)


def test_a_spec_whose_model_accepts_unknown_fields_is_refused() -> None:
    class Loose(BaseModel):
        text: str

    def run(inp: Loose, env: ToolEnv) -> dict[str, Any]:
        return {}

    def check(inp: Loose, env: ToolEnv) -> None:
        return None

    with pytest.raises(TypeError, match="extra='forbid'"):
        ToolSpec("loose", "compute", Loose, run, check, "a tool that ignores typos")
