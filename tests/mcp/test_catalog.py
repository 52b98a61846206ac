"""The catalog: schemas from a tool's input model, a task's own schema or its signature; which
tasks can be MCP tools; what one agent sees (the policy without its hooks)."""

from __future__ import annotations

from typing import Any

from governance.mcp.catalog import Catalog, input_schema, tool_entries
from governance.policy.engine import Policy
from tests.mcp.conftest import FakeApp, FakeTask, fake_app
from workers.tools import TOOLS


class SpecTask(FakeTask):
    def __init__(self, name: str) -> None:
        super().__init__(f"tools.{name}", lambda **kw: kw, name)
        self.spec = TOOLS[name]


def test_the_example_tools_take_their_input_models_schemas() -> None:
    echo = input_schema(SpecTask("echo"))
    assert echo is not None
    assert echo["properties"]["text"]["type"] == "string"
    assert echo["required"] == ["text"]
    assert echo["additionalProperties"] is False
    write = input_schema(SpecTask("write_file"))
    assert write is not None
    assert {"path", "content"} <= set(write["properties"])


def test_a_task_may_declare_its_schema() -> None:
    task = FakeTask("t.custom", lambda **kw: kw)
    task.mcp_input_schema = {"type": "object", "properties": {"q": {"type": "string"}}}  # type: ignore[attr-defined]
    assert input_schema(task) == {"type": "object", "properties": {"q": {"type": "string"}}}


def test_schemas_from_signatures() -> None:
    def body(query: str, pages: int = 1, *rest: Any, **extra: Any) -> None: ...

    schema = input_schema(FakeTask("t.search", body))
    assert schema is not None
    assert schema["required"] == ["query"]
    assert schema["properties"]["pages"] == {"default": 1, "title": "Pages", "type": "integer"}
    assert "rest" not in schema["properties"]
    assert schema.get("additionalProperties") is not False  # **extra takes more

    def positional(a: int, /) -> None: ...

    assert input_schema(FakeTask("t.pos", positional)) is None


def test_only_governed_tools_with_mcp_names_are_offered(policy: Policy) -> None:
    app = fake_app()
    bad = FakeTask("t.bad", lambda: None, "has:colon")
    reserved = FakeTask("t.reserved", lambda: None, "governance_result")
    plain = FakeTask("t.plain", lambda: None)
    plain.governed = False  # type: ignore[misc]
    twin = FakeTask("zz.echo", lambda text: None, "echo")
    app = FakeApp([*app.tasks.values(), bad, reserved, plain, twin])
    entries = tool_entries(app, policy)
    assert set(entries) == {"echo", "add", "write_file", "delete_file", "shell", "slow"}
    assert entries["echo"].task_name == "tools.echo"  # the first of two tasks of one tool


def test_hooks_never_hide_a_tool_but_deny_rules_and_allow_lists_do(policy: Policy) -> None:
    catalog = Catalog(fake_app(), policy)
    listed = catalog.listed(policy, "acme", "planner", "carol")
    assert [item.entry.name for item in listed] == ["add", "echo", "shell", "slow", "write_file"]
    shell = next(item for item in listed if item.entry.name == "shell")
    assert shell.tier == "act_with_approval"
    watcher = catalog.listed(policy, "acme", "watcher", None)
    assert {item.tier for item in watcher} == {"shadow"}
    assert catalog.listed(policy, "nosuch", "planner", None) == []
