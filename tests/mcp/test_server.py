"""The MCP server's handlers on the SDK's in-process client, against a fake gateway: what an
agent sees, what a call answers, progress, the timeout, result by id, call keys, cancellation."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from governance.mcp.catalog import CANCEL_TOOL, RESULT_TOOL
from governance.mcp.server import META_CALL_KEY, META_RUN, META_TASK_ID, META_WAIT
from governance.mcp.status import TaskView
from tests.mcp.conftest import FakeGateway, ServerFactory

Progress = list[tuple[float, str | None]]


def run(scenario: Any) -> Any:
    return anyio.run(scenario)


def recorder() -> tuple[Progress, Any]:
    seen: Progress = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    return seen, on_progress


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


def test_the_list_shows_what_the_policy_allows_this_agent_with_tiers(
    make_server: ServerFactory,
) -> None:
    async def listing(**who: Any) -> dict[str, Any]:
        async with Client(make_server(**who).server) as client:
            return {t.name: t for t in (await client.list_tools()).tools}

    planner = run(lambda: listing())
    assert set(planner) == {"echo", "add", "write_file", "shell", "slow", RESULT_TOOL, CANCEL_TOOL}
    assert "tier act_with_approval" in (planner["shell"].description or "")
    assert "tier act_auto" in (planner["echo"].description or "")
    assert (planner["write_file"].description or "").startswith("Write a file of the workspace.")
    assert planner["shell"].meta == {"governance/tier": "act_with_approval"}
    # the schema of a plain function's signature
    add = planner["add"].input_schema
    assert add["required"] == ["a"]
    assert add["properties"]["a"]["type"] == "integer"
    assert add["additionalProperties"] is False
    # no requester: an approval-tier tool is denied outright, so not listed; interns see no fs.*
    intern = run(lambda: listing(agent="intern-7", user=None))
    assert set(intern) == {"echo", "add", "slow", RESULT_TOOL, CANCEL_TOOL}
    # another tenant sees its own allow-list
    assert set(run(lambda: listing(tenant="beta"))) == {"echo", RESULT_TOOL, CANCEL_TOOL}


def test_an_allowed_call_answers_with_the_result_and_its_task_id(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    seen, on_progress = recorder()

    async def scenario() -> Any:
        async with Client(make_server().server) as client:
            return await client.call_tool("echo", {"text": "hi"}, progress_callback=on_progress)

    result = run(scenario)
    assert not result.is_error
    assert json.loads(text(result)) == {"echo": {"text": "hi"}}
    assert result.structured_content == {"echo": {"text": "hi"}}
    task_id = result.meta[META_TASK_ID]
    published = gateway.published[task_id]
    assert (published.ctx.tenant, published.ctx.agent, published.ctx.run) == (
        "acme",
        "planner",
        "run-1",
    )
    assert published.ctx.user == "carol"
    assert seen[0][1] == f"task {task_id}: published"


def test_a_denied_call_is_a_tool_error_with_the_policy_reason(make_server: ServerFactory) -> None:
    async def scenario() -> list[Any]:
        async with Client(make_server(agent="intern-7").server) as client:
            intern = await client.call_tool("write_file", {"path": "x"})
        async with Client(make_server().server) as client:
            return [
                intern,
                await client.call_tool("delete_file", {"path": "x"}),
                await client.call_tool("echo", {"text": "a secret"}),  # the hook, per call
            ]

    fs, unlisted, hooked = run(scenario)
    assert fs.is_error
    assert "interns may not" in text(fs)
    assert text(fs).startswith("denied: ")
    assert unlisted.is_error
    assert "is not allowed for tenant 'acme'" in text(unlisted)
    assert hooked.is_error
    assert "no secrets, says the hook" in text(hooked)


def test_an_unknown_tool_is_a_protocol_error(make_server: ServerFactory) -> None:
    async def scenario() -> MCPError:
        async with Client(make_server().server) as client:
            with pytest.raises(MCPError) as raised:
                await client.call_tool("nope", {})
            return raised.value

    assert "unknown tool 'nope'" in run(scenario).message


def test_a_waiting_call_reports_each_change_then_answers(make_server: ServerFactory) -> None:
    seen, on_progress = recorder()

    async def scenario() -> Any:
        async with Client(make_server().server) as client:
            return await client.call_tool("slow", {}, progress_callback=on_progress)

    result = run(scenario)
    assert json.loads(text(result)) == {"slow": True}
    messages = [m for _, m in seen]
    assert messages[1:] == [
        "waiting: concurrency 3/3, 2 ahead",
        "waiting: concurrency 3/3, 1 ahead",
        "running",
    ]
    assert [p for p, _ in seen] == [1, 2, 3, 4]  # progress only grows


def test_a_held_call_answers_after_the_timeout_with_how_to_follow_it(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        async with Client(make_server().server) as client:
            pending = await client.call_tool("shell", {"command": ["ls"]}, meta={META_WAIT: 0.2})
            task_id = pending.meta[META_TASK_ID]
            # the reviewers approve meanwhile; the task runs; its result is fetched by id
            gateway.published[task_id].views.append(
                TaskView(task_id, "SUCCESS", "done", "done", result={"ran": True})
            )
            fetched = await client.call_tool(RESULT_TOOL, {"task_id": task_id})
            cancel = await client.call_tool(CANCEL_TOOL, {"task_id": task_id})
            return pending, fetched, cancel

    pending, fetched, cancel = run(scenario)
    task_id = pending.meta[META_TASK_ID]
    assert not pending.is_error
    assert pending.structured_content["done"] is False
    assert pending.structured_content["state"] == "HELD"
    assert "held: 0 of 2 approvals" in text(pending)
    assert f"govctl held show {task_id}" in text(pending)
    assert "governance_result" in text(pending)
    assert json.loads(text(fetched)) == {"ran": True}
    assert "revoked" in text(cancel)
    assert gateway.cancelled == [(task_id, False)]


def test_only_the_agent_that_called_may_fetch_or_cancel(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> tuple[str, list[Any]]:
        async with Client(make_server().server) as client:
            done = await client.call_tool("echo", {"text": "mine"})
        task_id = done.meta[META_TASK_ID]
        answers = []
        for who in ({"agent": "other"}, {"tenant": "beta"}):
            async with Client(make_server(**who).server) as client:
                answers.append(await client.call_tool(RESULT_TOOL, {"task_id": task_id}))
                answers.append(await client.call_tool(CANCEL_TOOL, {"task_id": task_id}))
        return task_id, answers

    task_id, answers = run(scenario)
    for answer in answers:
        assert answer.is_error
        assert f"no task {task_id} of agent" in text(answer)
    assert gateway.cancelled == []


def test_a_call_key_names_one_task_per_agent_and_a_second_call_follows_it(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> list[Any]:
        answers = []
        async with Client(make_server().server) as client:
            for _ in range(2):
                answers.append(
                    await client.call_tool("echo", {"text": "once"}, meta={META_CALL_KEY: "k-1"})
                )
            answers.append(await client.call_tool(RESULT_TOOL, {"call_key": "k-1"}))
        async with Client(make_server(agent="other").server) as client:
            answers.append(
                await client.call_tool("echo", {"text": "once"}, meta={META_CALL_KEY: "k-1"})
            )
        return answers

    first, again, by_key, other = run(scenario)
    assert first.meta[META_TASK_ID] == again.meta[META_TASK_ID] == by_key.meta[META_TASK_ID]
    assert other.meta[META_TASK_ID] != first.meta[META_TASK_ID]
    assert len(gateway.published) == 2  # one per agent: the second call did not publish


def test_the_run_is_the_connections_unless_meta_names_one(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> list[Any]:
        async with Client(make_server(run=None).server) as client:
            return [
                await client.call_tool("echo", {"text": "a"}),
                await client.call_tool("echo", {"text": "b"}, meta={META_RUN: "conv-9"}),
                await client.call_tool("echo", {"text": "c"}, meta={META_RUN: "bad run!"}),
            ]

    own, named, bad = run(scenario)
    own_id = own.meta[META_TASK_ID]
    assert gateway.published[own_id].ctx.run == f"mcp-{own_id}"
    assert gateway.published[named.meta[META_TASK_ID]].ctx.run == "conv-9"
    assert bad.is_error
    assert "governance/run" in text(bad)


def test_cancelling_the_request_revokes_the_task(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    seen, on_progress = recorder()

    async def scenario() -> None:
        async with Client(make_server().server, mode="legacy") as client:
            with anyio.move_on_after(0.5):
                await client.call_tool("shell", {"command": ["ls"]}, progress_callback=on_progress)
            with anyio.fail_after(5):
                while not gateway.cancelled:
                    await anyio.sleep(0.01)

    run(scenario)
    [(task_id, terminate)] = gateway.cancelled
    assert seen[0][1] == f"task {task_id}: published"
    assert terminate is False


def test_cancel_running_terminate_is_passed_on(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> None:
        server = make_server(cancel_running="terminate")
        async with Client(server.server, mode="legacy") as client:
            with anyio.move_on_after(0.3):
                await client.call_tool("shell", {"command": ["ls"]})
            with anyio.fail_after(5):
                while not gateway.cancelled:
                    await anyio.sleep(0.01)

    run(scenario)
    assert [terminate for _, terminate in gateway.cancelled] == [True]


def test_cancelling_a_fetch_only_stops_waiting(
    make_server: ServerFactory, gateway: FakeGateway
) -> None:
    async def scenario() -> Any:
        async with Client(make_server().server, mode="legacy") as client:
            pending = await client.call_tool("shell", {"command": ["ls"]}, meta={META_WAIT: 0})
            with anyio.move_on_after(0.3):
                await client.call_tool(RESULT_TOOL, {"task_id": pending.meta[META_TASK_ID]})
            await anyio.sleep(0.2)
            return await client.call_tool(RESULT_TOOL, {"task_id": "no{such}id"})

    bad = run(scenario)
    assert gateway.cancelled == []
    assert bad.is_error
    assert "task_id: may only contain" in text(bad)
