"""The docs' table of govctl exit codes, checked row by row against a real worker and Redis.

The table (section "### Exit codes") is read from docs/operating.md; every row is one test
case, run by the scenario registered for its "when" cell below. A row without a scenario, a
scenario without a row, or an exit code missing from the table fails, so the table and govctl
cannot drift apart. Each case runs ``govctl`` as a separate process, as a script would, and
checks its exit code, its one-line ``error:`` and that no traceback was printed.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from governance.cli.errors import ExitCode
from governance.embedded import EmbeddedRedis
from governance.integration.runtime import GovernanceRuntime
from governance.store.keys import TenantKeys
from tests.e2e.observer import ObserverServer
from tests.e2e.test_e2e_govctl import govctl
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parents[2] / "docs" / "operating.md"


def exit_code_rows() -> list[tuple[int, str]]:
    """``(code, when)`` of every row of docs/operating.md's exit-code table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1]))
    return rows


ROWS = exit_code_rows()


@dataclass
class Env:
    """What a scenario may use: the e2e settings, the publisher app, the reviewers' keys."""

    e2e_env: dict[str, str]
    app: Celery
    runtime: GovernanceRuntime
    keys: dict[str, Path]
    state_server: EmbeddedRedis
    observer: ObserverServer
    tmp_path: Path

    def govctl(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return govctl(self.e2e_env, *args, **env)


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def submit(
    env: Env,
    tool: str,
    *args: str,
    tenant: str = "t-basic",
    agent: str = "cli-agent",
    user: str = "dana",
) -> tuple[str, ...]:
    """``submit tool TOOL`` for a context of the test policy, then ``args``."""
    return ("submit", "tool", tool, "-t", tenant, "-a", agent, "--run", "r-exit", "-u", user,
            *args)  # fmt: skip


def ok(env: Env) -> list[subprocess.CompletedProcess[str]]:
    # The shipped example, and the test policy (both warn: warnings print on stderr).
    example = README.parents[1] / "config" / "governance.yaml"
    warned = env.govctl("policy", "check", env.e2e_env["GOVERNANCE_CONFIG_PATH"])
    assert "warning: " in warned.stderr
    assert warned.returncode == 0, warned.stderr
    return [env.govctl("policy", "check", str(example))]


def accepted(env: Env) -> list[subprocess.CompletedProcess[str]]:
    queued = env.govctl(*submit(env, "echo", "-i", "text=hi", "--json"))
    held = env.govctl(*submit(env, "write_file", "-i", "path=a.txt", "-i", "content=x",
                              "--json", tenant="t-held"))  # fmt: skip
    assert json.loads(held.stdout)["state"] == "HELD"
    return [queued, held]


def not_found(env: Env) -> list[subprocess.CompletedProcess[str]]:
    shown = env.govctl("held", "show", "NOPE")
    assert shown.stderr.strip() == "error: unknown held task 'NOPE'"
    tool = env.govctl(*submit(env, "nope", "-i", "text=x"))
    assert "unknown tool 'nope'" in tool.stderr
    grant = env.govctl("grants", "revoke", "g-nope", "--tenant", "t-held")
    assert "unknown grant 'g-nope'" in grant.stderr
    return [shown, tool, grant]


def unknown_tenant(env: Env) -> list[subprocess.CompletedProcess[str]]:
    commands = [
        ("held", "list", "--tenant", "nosuch"),
        ("usage", "--tenant", "nosuch"),
        ("status", "--tenant", "nosuch"),
        ("audit", "tail", "--tenant", "nosuch"),
        ("audit", "verify", "--tenant", "nosuch"),
        ("grants", "list", "--tenant", "nosuch"),
        ("grants", "revoke", "g1", "--tenant", "nosuch"),
        ("reviewers", "list", "--tenant", "nosuch"),
        submit(env, "echo", "-i", "text=x", tenant="nosuch"),
    ]
    results = [env.govctl(*c) for c in commands]
    for command, result in zip(commands, results, strict=True):
        assert "unknown tenant 'nosuch'" in result.stderr, (command, result.stderr)
    return results


def denied(env: Env) -> list[subprocess.CompletedProcess[str]]:
    args = ("-i", "path=x", "-i", "content=x")
    plain = env.govctl(*submit(env, "write_file", *args, agent="intern-1"))
    waiting = env.govctl(*submit(env, "write_file", *args, "--wait", "30", agent="intern-1"))
    for result in (plain, waiting):
        assert result.stderr.startswith("error: denied: "), result.stderr
        assert "interns may not touch files" in result.stderr
    return [plain, waiting]


def invalid_input(env: Env) -> list[subprocess.CompletedProcess[str]]:
    tool = env.govctl(*submit(env, "echo", "-i", "badfield=1"))
    assert "badfield" in tool.stderr
    assert "Extra inputs are not permitted" in tool.stderr
    task = env.govctl("submit", "task", "tools.echo", "-t", "t-basic", "-a", "a", "--run", "r",
                      "-i", "text=x", "-i", "extra=1")  # fmt: skip
    assert "extra" in task.stderr
    return [tool, task]


def refused_decision(env: Env) -> list[subprocess.CompletedProcess[str]]:
    held = env.govctl(*submit(env, "write_file", "-i", "path=q.txt", "-i", "content=x",
                              "--json", tenant="t-quorum", user="bob"))  # fmt: skip
    task_id = json.loads(held.stdout)["task_id"]
    first = env.govctl("held", "approve", task_id, "--key", str(env.keys["alice"]))
    assert first.returncode == 0, first.stderr
    twice = env.govctl("held", "approve", task_id, "--key", str(env.keys["alice"]))
    assert "already approved" in twice.stderr
    stranger = env.govctl("held", "approve", task_id, "--key", str(env.keys["dana"]))
    assert "this key is not a reviewer's of tenant 't-quorum'" in stranger.stderr
    own = env.govctl("held", "approve", task_id, "--key", str(env.keys["bob"]))
    assert "may not approve it" in own.stderr
    not_held = env.govctl("held", "reject", "NOPE", "--key", str(env.keys["bob"]), "--reason", "x")
    return [twice, stranger, own, not_held]


def wait_held(env: Env) -> list[subprocess.CompletedProcess[str]]:
    result = env.govctl(*submit(env, "write_file", "-i", "path=w.txt", "-i", "content=x",
                                "--wait", "30", tenant="t-held"))  # fmt: skip
    task_id = result.stdout.split()[1].rstrip(":")
    assert f"task {task_id} is held for approval, not done" in result.stderr
    assert f"govctl held approve {task_id} --key PATH" in result.stderr
    as_json = env.govctl(*submit(env, "write_file", "-i", "path=w.txt", "-i", "content=x",
                                 "--wait", "30", "--json", tenant="t-held"))  # fmt: skip
    assert json.loads(as_json.stdout)["state"] == "HELD"
    return [result, as_json]


def wait_failed(env: Env) -> list[subprocess.CompletedProcess[str]]:
    result = env.govctl(*submit(env, "read_file", "-i", "path=missing-file.txt", "--wait", "30"))
    assert "ended FAILURE" in result.stderr, result.stderr
    return [result]


def wait_timeout(env: Env) -> list[subprocess.CompletedProcess[str]]:
    url = f"{env.observer.base_url}/slow?key=exit-codes&ms=4000"
    result = env.govctl(*submit(env, "http_get", "-i", f"url={url}", "--wait", "0.5",
                                tenant="t-other"))  # fmt: skip
    assert "did not finish within 0.5s" in result.stderr
    return [result]


def usage_error(env: Env) -> list[subprocess.CompletedProcess[str]]:
    result = env.govctl("held", "reject", "some-id")
    assert "--reason" in result.stderr
    return [result, env.govctl("held", "list", "--nope")]


def state_down(env: Env) -> list[subprocess.CompletedProcess[str]]:
    down = {"GOVERNANCE_STATE_REDIS_URL": closed_url()}
    results = [env.govctl("usage", **down), env.govctl("held", "list", **down)]
    for result in results:
        assert "unavailable" in result.stderr
    return results


def audit_broken(env: Env) -> list[subprocess.CompletedProcess[str]]:
    env.govctl(*submit(env, "echo", "-i", "text=x", "--wait", "30"))
    client = redis.Redis.from_url(env.state_server.url)
    try:
        stream = TenantKeys("t-basic").audit
        # Edited once sealed (an entry edited before its seal is written is only pending).
        wait_until(
            lambda: client.xrange(stream) and client.xrange(stream)[-1][1].get(b"type") == b"seal",
            10,
            "the task's entries to be sealed",
        )
        entries = client.xrange(stream)
        assert entries
        client.delete(stream)
        for n, (entry_id, fields) in enumerate(entries):
            if n == 0:
                fields[b"agent"] = b"someone-else"
            client.xadd(stream, fields, id=entry_id)
    finally:
        client.close()
    result = env.govctl("audit", "verify")
    assert "audit verification failed" in result.stderr
    return [result]


def invalid_config(env: Env) -> list[subprocess.CompletedProcess[str]]:
    bad = env.tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntenants: {acme: {concurrency: -1}}\n")
    policy = env.govctl("policy", "check", str(bad))
    assert f"{bad}: tenants.acme.concurrency" in policy.stderr
    app = env.govctl("held", "list", GOVERNANCE_APP="nosuch:app")
    assert "cannot import the Celery app 'nosuch:app'" in app.stderr
    settings = env.govctl("held", "list", GOVERNANCE_LEASE_MS="soon")
    assert "GOVERNANCE_LEASE_MS" in settings.stderr
    return [policy, app, settings]


def broker_down(env: Env) -> list[subprocess.CompletedProcess[str]]:
    result = env.govctl(*submit(env, "echo", "-i", "text=x"), GOVERNANCE_BROKER_URL=closed_url())
    assert "broker unavailable" in result.stderr
    return [result]


#: The README row's "when" cell (its start) -> the scenario that shows it.
SCENARIOS: dict[str, Callable[[Env], list[subprocess.CompletedProcess[str]]]] = {
    "ok: a submitted action": accepted,
    "ok": ok,
    "not found": not_found,
    "unknown tenant": unknown_tenant,
    "denied by the policy": denied,
    "invalid input": invalid_input,
    "a decision the approval rules refuse": refused_decision,
    "`--wait`: the task is held": wait_held,
    "`--wait`: the task failed": wait_failed,
    "`--wait`: the task did not finish in time": wait_timeout,
    "usage error": usage_error,
    "the state Redis": state_down,
    "audit verification failed": audit_broken,
    "invalid configuration": invalid_config,
    "the Celery broker": broker_down,
}


def scenario_for(when: str) -> Callable[[Env], list[subprocess.CompletedProcess[str]]]:
    """The scenario whose key starts the cell, the longest key first (``ok: ...`` before ``ok``)."""
    for key in sorted(SCENARIOS, key=len, reverse=True):
        if when == key or when.startswith(key + (" " if key == "ok" else "")):
            return SCENARIOS[key]
    raise AssertionError(f"no scenario for the README row {when!r}: add one to SCENARIOS")


def test_the_table_covers_every_exit_code_and_every_scenario_has_a_row() -> None:
    assert {code for code, _ in ROWS} == {int(c) for c in ExitCode}
    used = {scenario_for(when) for _, when in ROWS}
    assert used == set(SCENARIOS.values()), "a scenario without a README row"


def _row_id(row: tuple[int, str]) -> str:
    return f"{row[0]}-" + re.sub(r"[^a-z]+", "-", row[1].lower()).strip("-")[:40]


@pytest.mark.parametrize(("code", "when"), ROWS, ids=[_row_id(r) for r in ROWS])
def test_exit_code_row(
    code: int,
    when: str,
    app: Celery,
    runtime: GovernanceRuntime,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
    state_server: EmbeddedRedis,
    observer: ObserverServer,
    tmp_path: Path,
) -> None:
    env = Env(e2e_env, app, runtime, reviewer_keys, state_server, observer, tmp_path)
    results = scenario_for(when)(env)
    assert results
    for result in results:
        described = f"{' '.join(result.args[3:])}: {result.stderr}"
        assert result.returncode == code, described
        assert "Traceback" not in result.stderr, described
        if code == 0:  # warnings only (the shipped example names no reviewer keys)
            assert all(line.startswith("warning: ") for line in result.stderr.splitlines()), (
                described
            )
        else:
            assert result.stderr.startswith("error: ") or code == ExitCode.USAGE, described
