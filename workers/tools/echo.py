"""`echo`: returns its input; a tool without side effects, for demos and governance tests."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from workers.tools.base import ToolEnv, ToolInput, ToolSpec


class EchoInput(ToolInput):
    """The text to echo back."""

    text: Annotated[str, Field(max_length=10_000)]


def check(inp: EchoInput, env: ToolEnv) -> None:
    """Nothing to check beyond the input model."""


def run(inp: EchoInput, env: ToolEnv) -> dict[str, Any]:
    """Return the text unchanged."""
    return {"text": inp.text}


SPEC = ToolSpec(
    name="echo",
    side_effect_class="compute",
    input_model=EchoInput,
    run=run,
    check=check,
    description="Return the given text unchanged.",
)
