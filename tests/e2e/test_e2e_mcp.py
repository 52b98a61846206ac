"""MCP end to end: the ``mcp`` SDK's own client against ``govctl mcp serve`` (stdio, and
streamable HTTP with bearer tokens) and the session's real worker.

An agent lists exactly the tools its tenant's policy lets it call; an allowed call answers with
the result, a denied one with the policy's reason; a held call answers once reviewers approved
it with ``govctl``, with progress notifications meanwhile; a call over its tenant's concurrency
waits its turn, and a cancelled wait is revoked; HTTP refuses a missing or unknown token; 50
concurrent calls of two tenants keep each tenant's concurrency exactly (read from the audit
chain, not from times); a server killed with calls in flight loses nothing, runs nothing twice,
and a new one fetches every result by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from governance.integration.runtime import GovernanceRuntime
from governance.mcp.catalog import CANCEL_TOOL, RESULT_TOOL
from governance.mcp.server import META_CALL_KEY, META_RUN, META_TASK_ID, META_WAIT
from governance.mcp.tokens import TokenFile
from tests import govctl_runner as runner
from tests.e2e.conftest import WorkerProcess, audit_of, types_of, verify_audit
from tests.e2e.observer import ObserverServer
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
GOVCTL = [sys.executable, "-m", "governance.cli.main"]
TOOLS = {RESULT_TOOL, CANCEL_TOOL}


def server_env(e2e_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **e2e_env, "GOVERNANCE_APP": "workers.app:app"}
    env.pop("REDIS_URL", None)
    return env


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


class Progress:
    """The progress messages of one call; the first names its task."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.messages.append(message or "")

    @property
    def task_id(self) -> str | None:
        first = self.messages[0] if self.messages else ""
        return first.split()[1].rstrip(":") if first.startswith("task ") else None

    async def until(self, predicate: Callable[[str], bool], timeout_s: float = 30) -> None:
        with anyio.fail_after(timeout_s):
            while not any(predicate(m) for m in self.messages):
                await anyio.sleep(0.02)


# -- stdio -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stdio_agent(env: dict[str, str], log: Path, *args: str) -> AsyncIterator[Client]:
    """An MCP client that starts ``govctl mcp serve ARGS`` as its stdio server."""
    params = StdioServerParameters(
        command=GOVCTL[0], args=[*GOVCTL[1:], "mcp", "serve", *args], env=env, cwd=str(ROOT)
    )
    with log.open("a") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            yield client


def test_stdio_agent_lists_exactly_its_tools_calls_them_and_is_denied_with_the_reason(
    runtime: GovernanceRuntime, e2e_env: dict[str, str], tmp_path: Path
) -> None:
    env = server_env(e2e_env)

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with stdio_agent(
            env, tmp_path / "s1.log", "-t", "t-basic", "-a", "mcp-agent", "-u", "dana",
            "--run", "mcp-stdio-run",
        ) as client:  # fmt: skip
            seen["tools"] = {t.name: t for t in (await client.list_tools()).tools}
            seen["echo"] = await client.call_tool("echo", {"text": "hello"})
            seen["delete"] = await client.call_tool("delete_file", {"path": "x.txt"})
        async with stdio_agent(
            env, tmp_path / "s2.log", "-t", "t-basic", "-a", "intern-3"
        ) as client:
            seen["intern_tools"] = {t.name for t in (await client.list_tools()).tools}
            seen["intern_write"] = await client.call_tool(
                "write_file", {"path": "x.txt", "content": "no"}
            )
        return seen

    seen = anyio.run(scenario)
    assert set(seen["tools"]) == {"echo", "read_file", "write_file", "shell", *TOOLS}
    assert "act_with_approval" in (seen["tools"]["shell"].description or "")
    assert seen["tools"]["echo"].input_schema["required"] == ["text"]
    echo = seen["echo"]
    assert not echo.is_error
    assert json.loads(text(echo)) == {"text": "hello"}
    entries = audit_of(runtime, echo.meta[META_TASK_ID])
    assert types_of(entries) == ["admitted", "task_finished"]
    assert {e.fields["run"] for e in entries} == {"mcp-stdio-run"}
    assert {e.fields["agent"] for e in entries} == {"mcp-agent"}
    assert seen["delete"].is_error
    assert "tool 'delete_file' is not allowed for tenant 't-basic'" in text(seen["delete"])
    # No requester: the approval-tier shell is denied outright; interns may not touch files.
    assert seen["intern_tools"] == {"echo", *TOOLS}
    assert seen["intern_write"].is_error
    assert "interns may not touch files" in text(seen["intern_write"])
    # the denials the servers audited at publish time are sealed with the workers' key
    denied = audit_of(runtime, seen["intern_write"].meta[META_TASK_ID])
    assert types_of(denied) == ["authorization_denied"]
    assert verify_audit(runtime) == []


def test_stdio_held_call_answers_after_two_govctl_approvals_with_progress_meanwhile(
    runtime: GovernanceRuntime,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
    workspace: Path,
    tmp_path: Path,
) -> None:
    env = server_env(e2e_env)
    name = f"mcp-held-{uuid.uuid4().hex[:8]}.txt"
    progress = Progress()
    approvals: list[subprocess.CompletedProcess[str]] = []

    async def approve(task_id: str, reviewer: str) -> None:
        args = ("held", "approve", task_id, "--key", str(reviewer_keys[reviewer]))
        done = await anyio.to_thread.run_sync(partial(runner.run_govctl, *args, env=e2e_env))
        approvals.append(done)

    async def reviewers() -> None:
        await progress.until(lambda m: m == "held: 0 of 2 approvals")
        assert progress.task_id is not None
        await approve(progress.task_id, "alice")
        await progress.until(lambda m: m == "held: 1 of 2 approvals")
        await approve(progress.task_id, "bob")

    async def scenario() -> Any:
        async with stdio_agent(
            env, tmp_path / "held.log", "-t", "t-quorum", "-a", "mcp-agent", "-u", "dana"
        ) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(reviewers)
                result = await client.call_tool(
                    "write_file", {"path": name, "content": "approved"}, progress_callback=progress
                )
            return result

    result = anyio.run(scenario)
    assert [a.returncode for a in approvals] == [0, 0], [a.stderr for a in approvals]
    assert not result.is_error, text(result)
    assert json.loads(text(result))["bytes"] == len("approved")
    assert (workspace / name).read_text() == "approved"
    task_id = result.meta[META_TASK_ID]
    assert progress.task_id == task_id
    assert "held: 0 of 2 approvals" in progress.messages
    assert "held: 1 of 2 approvals" in progress.messages
    kinds = types_of(audit_of(runtime, task_id))
    assert kinds.count("admitted") == 1
    assert kinds[-1] == "task_finished"


# -- streamable HTTP ---------------------------------------------------------------------------


class HttpServer:
    """``govctl mcp serve --transport http`` as a process of its own, on a free port."""

    def __init__(self, env: dict[str, str], tokens: Path, log: Path, *args: str) -> None:
        self.env, self.tokens, self.log, self.args = env, tokens, log, args
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> HttpServer:
        with self.log.open("a") as errlog:
            self.process = subprocess.Popen(
                [*GOVCTL, "mcp", "serve", "--transport", "http", "--port", "0",
                 "--tokens", str(self.tokens), "--json", *self.args],
                env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=errlog, text=True,
            )  # fmt: skip
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise AssertionError(f"the MCP server did not start:\n{self.log.read_text()}")
        self.url = json.loads(line)["url"]
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


AGENTS = {
    "conc": ("t-conc", "mcp-agent", None),
    "line": ("t-line", "mcp-agent", None),
    "load": ("t-load", "mcp-agent", None),
    "held": ("t-held", "mcp-agent", "dana"),
    "held-other": ("t-held", "other-agent", "dana"),
}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("mcp") / "tokens.json"
    file = TokenFile(path)
    return path, {name: file.add(*who)[0] for name, who in AGENTS.items()}


@pytest.fixture(scope="module")
def http_server(
    worker: WorkerProcess,
    e2e_env: dict[str, str],
    token_file: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HttpServer]:
    log = tmp_path_factory.mktemp("mcp-http") / "server.log"
    # Long enough for a tenant of concurrency 1 to run its 25 calls one after another on a
    # loaded machine: every call here is to answer with its result (no timed assertion).
    server = HttpServer(server_env(e2e_env), token_file[0], log, "--call-timeout", "300").start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def http_agent(url: str, token: str | None, **options: Any) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    timeout = httpx2.Timeout(30, read=300)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), **options) as client,
    ):
        yield client


def test_http_refuses_missing_and_unknown_tokens_and_binds_runs(
    runtime: GovernanceRuntime, http_server: HttpServer, token_file: tuple[Path, dict[str, str]]
) -> None:
    tokens = token_file[1]
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    for token in (None, "gmcp_not-a-token", tokens["conc"] + "x"):
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        assert httpx2.post(http_server.url, json=body, headers=sent).status_code == 401

    async def refused(token: str | None) -> BaseException | None:
        try:
            async with http_agent(http_server.url, token) as client:
                await client.list_tools()
        except BaseException as exc:  # the SDK raises from its task group
            return exc
        return None

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {"refused": [await refused(None), await refused("gmcp_nope")]}
        async with http_agent(http_server.url, tokens["conc"]) as client:  # 2026-07-28
            seen["tools"] = {t.name for t in (await client.list_tools()).tools}
            seen["own_run"] = await client.call_tool("echo", {"text": "a"})
            seen["named_run"] = await client.call_tool(
                "echo", {"text": "b"}, meta={META_RUN: "r-9"}
            )
        async with http_agent(http_server.url, tokens["conc"], mode="legacy") as client:
            seen["session"] = [await client.call_tool("echo", {"text": t}) for t in "cd"]
        return seen

    seen = anyio.run(scenario)
    assert all(exc is not None for exc in seen["refused"])
    assert seen["tools"] == {"echo", "http_get", *TOOLS}

    def run_of(result: Any) -> str:
        assert not result.is_error, text(result)
        (run,) = {e.fields["run"] for e in audit_of(runtime, result.meta[META_TASK_ID])}
        return str(run)

    own = seen["own_run"].meta[META_TASK_ID]
    assert run_of(seen["own_run"]) == f"mcp-{own}"  # no session, no run named: its own
    assert run_of(seen["named_run"]) == "r-9"
    first, second = (run_of(r) for r in seen["session"])
    assert first == second  # a session is a run
    assert first.startswith("mcp-")
    assert first != f"mcp-{seen['session'][0].meta[META_TASK_ID]}"


def test_http_call_over_concurrency_waits_its_turn_and_a_cancelled_wait_is_revoked(
    runtime: GovernanceRuntime,
    http_server: HttpServer,
    token_file: tuple[Path, dict[str, str]],
    observer: ObserverServer,
) -> None:
    key = f"mcp-turn-{uuid.uuid4().hex[:6]}"
    slow = {"url": f"{observer.base_url}/slow?key={key}&ms=1500"}
    never = {"url": f"{observer.base_url}/slow?key={key}-cancelled&ms=10"}
    token = token_file[1]["conc"]
    first, second, third = Progress(), Progress(), Progress()
    results: dict[str, Any] = {}

    async def call(name: str, tool: str, arguments: dict[str, Any], progress: Progress) -> None:
        async with http_agent(http_server.url, token) as client:
            results[name] = await client.call_tool(tool, arguments, progress_callback=progress)

    async def cancelled_call() -> None:
        async with http_agent(http_server.url, token) as client:
            with anyio.CancelScope() as scope:

                async def cancel_once_waiting() -> None:
                    await third.until(lambda m: m.startswith("waiting: concurrency"))
                    scope.cancel()

                async with anyio.create_task_group() as group:
                    group.start_soon(cancel_once_waiting)
                    await client.call_tool("http_get", never, progress_callback=third)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(call, "slow", "http_get", slow, first)
            await first.until(lambda m: m == "running")
            group.start_soon(call, "echo", "echo", {"text": "my turn"}, second)
            await second.until(lambda m: m.startswith("waiting: concurrency"))
            group.start_soon(cancelled_call)

    anyio.run(scenario)
    assert not results["slow"].is_error, text(results["slow"])
    assert json.loads(text(results["echo"])) == {"text": "my turn"}
    assert "waiting: concurrency 1/1, next in line" in second.messages
    assert any(m.startswith("waiting: concurrency 1/1") for m in third.messages)
    # the echo waited for the slow call: it was admitted after that one finished
    entries = runtime.audit_log.records("t-conc")
    order = [
        (e.fields["type"], e.fields["task_id"])
        for e in entries
        if e.fields["type"] in ("admitted", "task_finished")
    ]
    slow_id, echo_id = (results[n].meta[META_TASK_ID] for n in ("slow", "echo"))
    assert order.index(("task_finished", slow_id)) < order.index(("admitted", echo_id))
    # the cancelled call's task never ran: revoked while it waited, it left the ledger
    cancelled_id = third.task_id
    assert cancelled_id is not None
    wait_until(
        lambda: "task_revoked" in types_of(audit_of(runtime, cancelled_id)),
        30,
        "the cancelled call's task to be revoked",
    )
    assert "admitted" not in types_of(audit_of(runtime, cancelled_id))
    assert observer.observations.counts[f"{key}-cancelled"] == 0
    assert observer.observations.counts[key] == 1


def _peak_in_flight(runtime: GovernanceRuntime, tenant: str, task_ids: set[str]) -> int:
    """The most tasks of ``task_ids`` admitted and not yet finished at once, in the order the
    tenant's audit chain recorded their admissions and ends (the scripts that took and gave
    back the slots wrote them)."""
    running: set[str] = set()
    peak = 0
    for entry in runtime.audit_log.records(tenant):
        task_id, kind = entry.fields.get("task_id"), entry.fields["type"]
        if task_id not in task_ids:
            continue
        if kind == "admitted":
            running.add(task_id)
            peak = max(peak, len(running))
        elif kind in ("task_finished", "task_failed"):
            running.discard(task_id)
    return peak


def test_http_fifty_concurrent_calls_of_two_tenants_keep_each_limit_exactly(
    runtime: GovernanceRuntime, http_server: HttpServer, token_file: tuple[Path, dict[str, str]]
) -> None:
    tokens = token_file[1]
    results: dict[str, list[Any]] = {"line": [], "load": []}

    async def agent(name: str) -> None:
        async with http_agent(http_server.url, tokens[name]) as client:

            async def one(i: int) -> None:
                result = await client.call_tool("echo", {"text": f"{name}-{i}"})
                results[name].append((i, result))

            async with anyio.create_task_group() as group:
                for i in range(25):
                    group.start_soon(one, i)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(agent, "line")
            group.start_soon(agent, "load")

    anyio.run(scenario)
    for name, tenant, limit in (("line", "t-line", 1), ("load", "t-load", 3)):
        answers = results[name]
        assert len(answers) == 25
        for i, result in answers:
            assert not result.is_error, text(result)
            assert json.loads(text(result)) == {"text": f"{name}-{i}"}
        ids = {result.meta[META_TASK_ID] for _, result in answers}
        assert len(ids) == 25
        kinds = [
            e.fields["type"]
            for e in runtime.audit_log.records(tenant)
            if e.fields.get("task_id") in ids
        ]
        assert kinds.count("admitted") == 25
        assert kinds.count("task_finished") == 25
        assert _peak_in_flight(runtime, tenant, ids) <= limit
    # concurrency 1 is never exceeded: t-line's admissions and ends alternate
    line_ids = {r.meta[META_TASK_ID] for _, r in results["line"]}
    assert _peak_in_flight(runtime, "t-line", line_ids) == 1


def test_http_timeout_answers_where_the_task_is_and_only_its_agent_fetches_it(
    runtime: GovernanceRuntime,
    http_server: HttpServer,
    token_file: tuple[Path, dict[str, str]],
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
    workspace: Path,
) -> None:
    tokens = token_file[1]
    name = f"mcp-late-{uuid.uuid4().hex[:8]}.txt"

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with http_agent(http_server.url, tokens["held"]) as client:
            seen["pending"] = await client.call_tool(
                "write_file", {"path": name, "content": "later"}, meta={META_WAIT: 1}
            )
        task_id = seen["pending"].meta[META_TASK_ID]
        async with http_agent(http_server.url, tokens["held-other"]) as client:
            seen["other_fetch"] = await client.call_tool(RESULT_TOOL, {"task_id": task_id})
            seen["other_cancel"] = await client.call_tool(CANCEL_TOOL, {"task_id": task_id})
        approve = ("held", "approve", task_id, "--key", str(reviewer_keys["alice"]))
        seen["approved"] = await anyio.to_thread.run_sync(
            partial(runner.run_govctl, *approve, env=e2e_env)
        )
        async with http_agent(http_server.url, tokens["held"]) as client:
            seen["fetched"] = await client.call_tool(RESULT_TOOL, {"task_id": task_id})
        return seen

    seen = anyio.run(scenario)
    pending = seen["pending"]
    task_id = pending.meta[META_TASK_ID]
    assert not pending.is_error
    assert pending.structured_content["done"] is False
    assert pending.structured_content["state"] == "HELD"
    assert pending.structured_content["approvals"] == 0
    assert "held: 0 of 1 approval" in text(pending)
    assert f"govctl held show {task_id}" in text(pending)
    for refused in (seen["other_fetch"], seen["other_cancel"]):
        assert refused.is_error
        assert f"no task {task_id} of agent 'other-agent'" in text(refused)
    assert seen["approved"].returncode == 0, seen["approved"].stderr
    fetched = seen["fetched"]
    assert not fetched.is_error, text(fetched)
    assert json.loads(text(fetched))["bytes"] == len("later")
    assert (workspace / name).read_text() == "later"
    assert types_of(audit_of(runtime, task_id)).count("admitted") == 1


def test_a_killed_server_loses_no_call_and_a_new_one_fetches_every_result_by_id(
    runtime: GovernanceRuntime,
    worker: WorkerProcess,
    e2e_env: dict[str, str],
    token_file: tuple[Path, dict[str, str]],
    observer: ObserverServer,
    tmp_path: Path,
) -> None:
    token = token_file[1]["conc"]
    key = f"mcp-kill-{uuid.uuid4().hex[:6]}"
    slow = {"url": f"{observer.base_url}/slow?key={key}&ms=400"}
    env = server_env(e2e_env)
    first = HttpServer(env, token_file[0], tmp_path / "first.log").start()
    progress = [Progress() for _ in range(4)]
    call_keys = [f"{key}-{i}" if i % 2 == 0 else None for i in range(4)]

    async def call(i: int) -> None:
        meta = {META_CALL_KEY: call_keys[i]} if call_keys[i] else None
        async with http_agent(first.url, token) as client:
            await client.call_tool("http_get", slow, progress_callback=progress[i], meta=meta)

    async def in_flight_then_killed() -> None:
        with contextlib.suppress(BaseException):  # the calls die with their server
            async with anyio.create_task_group() as group:
                for i in range(4):
                    group.start_soon(call, i)
                for each in progress:
                    await each.until(lambda m: m.startswith("task "))
                await progress[0].until(lambda m: m == "running")
                await anyio.to_thread.run_sync(first.kill)

    try:
        anyio.run(in_flight_then_killed)
    finally:
        first.stop()
    task_ids = [p.task_id for p in progress]
    assert all(task_ids), [p.messages for p in progress]
    second = HttpServer(env, token_file[0], tmp_path / "second.log").start()
    try:

        async def fetch_all() -> list[Any]:
            async with http_agent(second.url, token) as client:
                fetched = [await client.call_tool(RESULT_TOOL, {"task_id": t}) for t in task_ids]
                again = await client.call_tool("http_get", slow, meta={META_CALL_KEY: call_keys[0]})
                by_key = await client.call_tool(RESULT_TOOL, {"call_key": call_keys[2]})
                return [*fetched, again, by_key]

        answers = anyio.run(fetch_all)
    finally:
        second.stop()
    for answer in answers:
        assert not answer.is_error, text(answer)
        assert json.loads(text(answer))["status"] == 200
    assert answers[4].meta[META_TASK_ID] == task_ids[0]  # the same call key: the same task
    assert answers[5].meta[META_TASK_ID] == task_ids[2]
    assert observer.observations.counts[key] == 4  # every call ran, none twice
    for task_id in task_ids:
        assert types_of(audit_of(runtime, task_id)).count("admitted") == 1
