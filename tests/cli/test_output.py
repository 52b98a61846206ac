"""What scripts and people read from govctl: ``--json`` on every command that prints a table,
``audit tail`` readable at 100 columns, and clear errors instead of tracebacks."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import typer

from governance.cli.main import app
from governance.store.audit import AuditEvent, AuditEventType, AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.state import StateStore
from tests.cli.conftest import ROOT, Govctl

#: Commands that print no table: a key file and one policy line; a server in the foreground.
NO_TABLE = {"reviewers keygen"}


def leaf_commands() -> dict[str, Any]:
    """Every govctl command, by its full name (``held list``, ``usage``, ...)."""
    found: dict[str, Any] = {}

    def walk(command: Any, prefix: str) -> None:
        if isinstance(getattr(command, "commands", None), dict):
            for name, sub in command.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            found[prefix] = command

    walk(typer.main.get_command(app), "")
    return found


def test_every_command_that_prints_a_table_takes_json() -> None:
    commands = leaf_commands()
    assert {"held list", "usage", "audit tail", "policy check", "status"} <= set(commands)
    missing = [
        name
        for name, command in sorted(commands.items())
        if name not in NO_TABLE
        and not any("--json" in getattr(p, "opts", ()) for p in command.params)
    ]
    assert not missing, f"commands without --json: {missing}"


def test_every_table_command_prints_json(govctl: Govctl, reviewer_keys: dict[str, Path]) -> None:
    """Each command with ``--json`` prints one JSON document on stdout and nothing else."""
    held = json.loads(
        govctl("submit", "tool", "shell", "-t", "acme", "-a", "planner", "--run", "r1",
               "-u", "carol", "-i", 'command:=["ls"]', "--json").stdout
    )  # fmt: skip
    other = json.loads(
        govctl("submit", "tool", "shell", "-t", "acme", "-a", "planner", "--run", "r1",
               "-u", "carol", "-i", 'command:=["pwd"]', "--json").stdout
    )  # fmt: skip
    alice = str(reviewer_keys["alice"])
    covered = {
        "submit tool": held,
        "held list": ("held", "list"),
        "held show": ("held", "show", held["task_id"]),
        "held approve": ("held", "approve", held["task_id"], "--key", alice),
        "held reject": ("held", "reject", other["task_id"], "--key", alice, "--reason", "no"),
        "held expire": ("held", "expire"),
        "reviewers list": ("reviewers", "list"),
        "grants list": ("grants", "list"),
        "usage": ("usage", "--tenant", "acme"),
        "status": ("status",),
        "audit tail": ("audit", "tail"),
        "audit verify": ("audit", "verify"),
        "policy check": ("policy", "check"),
        "policy explain": ("policy", "explain", "-t", "acme", "-a", "bot", "-x", "echo"),
        "policy status": ("policy", "status"),
        "run close": ("run", "close", "r1", "-t", "acme"),
        "tenants pause": ("tenants", "pause", "acme"),
        "tenants resume": ("tenants", "resume", "acme"),
        "limits override": ("limits", "override", "acme", "weight=2", "--for", "1m"),
        "submit task": ("submit", "task", "tools.echo", "-t", "acme", "-a", "a", "--run", "r",
                        "-i", "text=hi"),
        "submit llm": ("submit", "llm", "-t", "acme", "-a", "a", "--run", "r", "-p", "fake",
                       "-m", "fake-small", "--message", "hi", "--max-tokens", "5"),
    }  # fmt: skip
    for name, args in covered.items():
        if isinstance(args, dict):
            continue  # already parsed above
        result = govctl(*args, "--json")
        assert result.returncode == 0, (name, result.stderr)
        json.loads(result.stdout)  # one JSON document, nothing else on stdout
    untested = set(leaf_commands()) - set(covered) - NO_TABLE
    # grants revoke needs a grant and tenants end a tenant removed from the policy (tests/e2e),
    # dev redis runs a server (test_dev_redis.py), the mcp commands' --json is tested in
    # tests/mcp/test_cli.py (serve runs a server).
    mcp = {"mcp serve", "mcp tools", "mcp token add", "mcp token list", "mcp token remove"}
    assert untested <= {"grants revoke", "tenants end", "dev redis", *mcp}, untested


def test_audit_tail_reads_well_at_100_columns(govctl: Govctl, state: StateStore) -> None:
    """No line over 100 columns but a single unbreakable word, no word cut in two, and a failed
    task reads "failed", not the policy's "allow" of its admission."""
    log = AuditLog(state, AuditSealer(b"cli-test-audit-key"))
    url = "https://example.com/" + "a-very-long-path/" * 8
    events = [
        AuditEvent(type=AuditEventType.AUTHORIZATION_DENIED, tenant="acme", agent="intern-joe",
                   run="run-1", task_id="3f1c0a52-0b8e-4a57-9a43-1d2b3c4d5e6f",
                   action="write_file", decision="deny",
                   reason="tool 'write_file' denied for agent 'intern-joe' of tenant 'acme': "
                          "interns may not touch files"),
        AuditEvent(type=AuditEventType.TASK_FAILED, tenant="acme", agent="planner", run="run-1",
                   task_id="7d2e8b11-aaaa-4bbb-8ccc-123456789abc", action="http_get",
                   decision="allow", tier="act_auto",
                   reason=f"ActionFailed: permanent: HTTP 404 from {url}"),
        AuditEvent(type=AuditEventType.APPROVED, tenant="acme", agent="planner", run="run-1",
                   task_id="9e9e9e9e-0000-4000-8000-000000000001", action="shell",
                   decision="approve", reviewer="alice", reason="looks fine"),
    ]  # fmt: skip
    for event in events:
        log.append(event)
    result = govctl("audit", "tail", "-n", "10", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for line in text.splitlines():
        assert len(line) <= 100 or " " not in line.strip(), line
    lines = text.splitlines()
    for event in events:  # every word of every field is whole on some line of the output
        for value in (event.reason, event.task_id, event.agent, event.action):
            for word in value.split():
                assert any(word in line for line in lines), (word, text)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 3
    denied, failed, approved = blocks
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  denied  acme/intern-joe", denied)
    assert "  failed  acme/planner  run run-1  http_get" in failed.splitlines()[0]
    assert "allow" not in failed
    assert "approved by alice" in approved.splitlines()[0]
    # The policy's own verdicts are all in --json.
    tail = json.loads(govctl("audit", "tail", "--json").stdout)
    assert [e["decision"] for e in tail] == ["deny", "allow", "approve"]


def test_a_custom_task_refuses_a_field_it_does_not_take(govctl: Govctl, redis_url: str) -> None:
    """A team's own task (its input is its function's parameters): an unknown field, a missing
    one, too many arguments are one clear error line and exit 1, never a traceback."""
    env = {
        "GOVERNANCE_APP": "tests.e2e.own_app:app",
        "GOVERNANCE_CONFIG_PATH": str(ROOT / "tests" / "e2e" / "own-policy.yaml"),
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
    }
    base = ("submit", "task", "own.stamp", "-t", "own-acme", "-a", "bot", "--run", "r1")
    cases = {
        ("-i", "label=x", "-i", "ms:=5", "-i", "badfield=1"): "unknown input field(s) 'badfield'",
        ("-i", "label=x",): "missing a required argument: 'ms'",
        ("--arg", '"x"', "--arg", "1", "--arg", "2"): "too many positional arguments",
    }  # fmt: skip
    for args, message in cases.items():
        result = govctl(*base, *args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"error: invalid input for task 'own.stamp': {message} (it takes: label, ms)\n"
        )
    tool = govctl("submit", "tool", "own.upper", "-t", "own-acme", "-a", "b", "--run", "r",
                  "-i", "badfield=1", env=env)  # fmt: skip
    assert tool.returncode == 1
    assert "unknown input field(s) 'badfield'" in tool.stderr
    assert "Traceback" not in tool.stderr


def test_tables_never_cut_a_word_at_120_to_200_columns(govctl: Govctl, state: StateStore) -> None:
    """Each column is at least as wide as its longest word; a terminal too narrow for that gets
    one block per row instead (``column: value`` lines, wrapped at spaces)."""
    from governance.store.held import HeldStore
    from tests.cli.test_state_commands import held_task, put

    store = HeldStore(state)
    values = ["planner-assistant-for-reports", "run-2026-11-21-nightly-batch", "carol.smith"]
    for n in range(2):
        task = held_task("acme", n, requested_ms=1_700_000_000_000 + n)
        task = dataclasses.replace(task, agent=values[0], run=values[1], user=values[2])
        put(store, task)
    for columns in (100, 120, 135, 150, 200):
        shown = govctl("held", "list", env={"COLUMNS": str(columns)})
        assert shown.returncode == 0, shown.stderr
        words = [word.removesuffix(":") for word in shown.stdout.split()]
        for value in (*values, "task-acme-000000", "task-acme-000001", "approvals", "requested"):
            assert value in words, (columns, value, shown.stdout)
        assert max(len(line.rstrip()) for line in shown.stdout.splitlines()) <= columns
