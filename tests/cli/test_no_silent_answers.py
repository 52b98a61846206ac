"""No silent wrong answers: govctl refuses a Redis that holds no deployment (a variable left
unset), names the variable of a policy file that is not there, and keeps working from the last
valid version of a policy file that became invalid, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from governance.cli.context import shown_url
from governance.store.deployment import read_marker, write_marker
from governance.store.held import HeldStore
from governance.store.state import StateStore
from tests.cli.conftest import ROOT, Govctl, run_govctl
from tests.cli.test_output import leaf_commands
from tests.cli.test_state_commands import held_task, put

#: A short lease: workers refresh their mark every half heartbeat, and govctl waits that long
#: for one before it refuses.
FAST = {"GOVERNANCE_LEASE_MS": "600"}

#: Commands that read or write no deployment state: the policy file, keys, a server of their own.
STATELESS = {
    "policy check", "policy explain", "reviewers keygen", "reviewers list", "dev redis",
    "mcp serve", "mcp tools", "mcp token add", "mcp token list", "mcp token remove",
}  # fmt: skip


def _db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def state_commands(task_id: str, key: str) -> dict[str, tuple[str, ...]]:
    submit = ("-t", "acme", "-a", "planner", "--run", "r1", "-u", "carol")
    return {
        "held list": ("held", "list"),
        "held show": ("held", "show", task_id),
        "held approve": ("held", "approve", task_id, "--key", key),
        "held reject": ("held", "reject", task_id, "--key", key, "--reason", "no"),
        "held expire": ("held", "expire"),
        "grants list": ("grants", "list"),
        "grants revoke": ("grants", "revoke", "g1", "--tenant", "acme"),
        "usage": ("usage",),
        "status": ("status",),
        "audit tail": ("audit", "tail"),
        "audit verify": ("audit", "verify"),
        "policy status": ("policy", "status"),
        "run close": ("run", "close", "r1", "-t", "acme"),
        "tenants pause": ("tenants", "pause", "acme"),
        "tenants resume": ("tenants", "resume", "acme"),
        "tenants end": ("tenants", "end", "gone"),
        "limits override": ("limits", "override", "acme", "concurrency=2"),
        "submit tool": ("submit", "tool", "echo", *submit, "-i", "text=hi"),
        "submit task": ("submit", "task", "tools.echo", *submit, "-i", "text=hi"),
        "submit llm": ("submit", "llm", *submit, "-p", "fake", "-m", "fake-small",
                       "--message", "hi", "--max-tokens", "5"),
    }  # fmt: skip


def test_without_the_state_url_every_state_command_refuses_the_brokers_database(
    govctl: Govctl,
    cli_env: dict[str, str],
    redis_url: str,
    redis_client: redis.Redis,
    reviewer_keys: dict[str, Path],
) -> None:
    """The workers' state is in database 1, with a held task; the broker is database 0. With
    ``GOVERNANCE_STATE_REDIS_URL`` unset, govctl would read database 0 and answer "no held
    task", "ok: 0 entries verified", ...: every command that reads state refuses instead."""
    state_url = _db(redis_url, 1)
    state = StateStore(redis.Redis.from_url(state_url))
    write_marker(state, "worker-1@host")
    task = held_task("acme", 1, requested_ms=1_000)
    put(HeldStore(state), task)
    env = {**cli_env, **FAST, "GOVERNANCE_BROKER_URL": _db(redis_url, 0)}
    env.pop("GOVERNANCE_STATE_REDIS_URL")
    redis_client.flushdb()  # database 0: the broker's, which no worker marked

    commands = state_commands(task.task_id, str(reviewer_keys["alice"]))
    assert set(commands) | STATELESS == set(leaf_commands()), "a command is not covered"
    for name, args in commands.items():
        result = run_govctl(*args, env=env)
        assert result.returncode == 5, (name, result.returncode, result.stdout, result.stderr)
        assert result.stdout == "", name
        assert result.stderr == (
            f"error: the Redis govctl reads, {_db(redis_url, 0)} (GOVERNANCE_STATE_REDIS_URL is "
            "unset, so govctl reads the broker's Redis, GOVERNANCE_BROKER_URL), holds no "
            "governance deployment: no worker has ever run with it as its state Redis. Set "
            "GOVERNANCE_STATE_REDIS_URL to the URL your workers use (`make redis` prints it), "
            "or start a worker first\n"
        ), name

    # Set to the workers' database, the same commands answer from it.
    shown = run_govctl(
        "held", "list", "--json", env={**env, "GOVERNANCE_STATE_REDIS_URL": state_url}
    )
    assert shown.returncode == 0, shown.stderr
    assert [t["task_id"] for t in json.loads(shown.stdout)["tasks"]] == [task.task_id]


def test_a_state_url_set_to_a_redis_without_a_deployment_is_named(
    govctl: Govctl, cli_env: dict[str, str], redis_url: str
) -> None:
    wrong = _db(redis_url, 7)
    redis.Redis.from_url(wrong).flushdb()
    result = govctl("audit", "verify", env={**FAST, "GOVERNANCE_STATE_REDIS_URL": wrong})
    assert result.returncode == 5
    assert result.stderr.startswith(
        f"error: the Redis govctl reads, GOVERNANCE_STATE_REDIS_URL={wrong}, holds no "
        "governance deployment"
    )


def test_a_mark_written_while_govctl_waits_is_found(
    cli_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """Workers refresh their mark every half heartbeat: a state flushed a moment ago (tests
    do) is marked again before govctl gives up."""
    from tests.govctl_runner import govctl_process

    redis_client.flushall()
    waiting = govctl_process("held", "list", "--json", env={**cli_env, **FAST})
    write_marker(StateStore(redis_client), "worker-2@host")
    stdout, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert json.loads(stdout)["tasks"] == []
    found = read_marker(StateStore(redis_client))
    assert found is not None
    assert found.node == "worker-2@host"


def test_a_password_in_a_url_is_never_printed() -> None:
    assert shown_url("redis://:s3cret@redis:6379/1") == "redis://:***@redis:6379/1"
    assert shown_url("rediss://gov:s3cret@redis/1") == "rediss://gov:***@redis/1"
    assert shown_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_policy_file_that_is_not_there_names_its_variable(
    govctl: Govctl, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    missing = tmp_path / "nowhere" / "policy.yaml"
    result = govctl("held", "list", env={"GOVERNANCE_CONFIG_PATH": str(missing)})
    assert result.returncode == 5
    assert result.stderr == (
        f"error: {missing}: file not found (GOVERNANCE_CONFIG_PATH={missing}): set "
        "GOVERNANCE_CONFIG_PATH to the policy file your workers load\n"
    )
    # Unset, in a folder without config/governance.yaml: its default, and where it was read.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({k: v for k, v in cli_env.items() if k != "GOVERNANCE_CONFIG_PATH"})
    env.pop("GOVERNANCE_CONFIG_PATH", None)
    env["PYTHONPATH"] = str(ROOT)
    for args in (("held", "list"), ("policy", "explain", "-t", "a", "-a", "b", "-x", "echo")):
        done = subprocess.run(
            [sys.executable, "-m", "governance.cli.main", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 5, done.stderr
        assert done.stderr == (
            "error: config/governance.yaml: file not found (GOVERNANCE_CONFIG_PATH is unset, and "
            f"its default is config/governance.yaml, relative to {tmp_path}): set "
            "GOVERNANCE_CONFIG_PATH to the policy file your workers load\n"
        )


# -- an invalid policy file ---------------------------------------------------------------------


@pytest.fixture
def held_id(govctl: Govctl) -> str:
    """A held call of acme (shell needs approval), submitted while the policy is valid."""
    done = govctl("submit", "tool", "shell", "-t", "acme", "-a", "planner", "--run", "r1",
                  "-u", "carol", "-i", 'command:=["ls"]', "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    task_id: str = json.loads(done.stdout)["task_id"]
    return task_id


def _break(policy: Path) -> str:
    text = policy.read_text()
    policy.write_text(text.replace("concurrency: 3", "concurrency: -1", 1))
    return (
        f"{policy}: tenants.acme.concurrency: Input should be greater than or equal to 0 (got -1)"
    )


def test_an_invalid_policy_file_falls_back_on_its_last_valid_version(
    govctl: Govctl, cli_config: Path, held_id: str, reviewer_keys: dict[str, Path]
) -> None:
    """Every process that loaded the valid file kept a copy beside it; with the file broken,
    reading state and deciding held tasks work from that copy, and each says so."""
    copy = cli_config.with_name(f".{cli_config.name}.last-valid")
    assert copy.read_text() == cli_config.read_text()
    valid = copy.read_text()
    error = _break(cli_config)

    for args in (
        ("held", "list", "--json"),
        ("audit", "tail", "--json"),
        ("status", "--json"),
        ("usage", "--tenant", "acme", "--json"),
        ("held", "approve", held_id, "--key", str(reviewer_keys["alice"]), "--json"),
    ):
        result = govctl(*args)
        assert result.returncode == 0, (args, result.stderr)
        json.loads(result.stdout)
        lines = result.stderr.splitlines()
        assert lines[0].startswith(
            f"warning: the policy file {cli_config} is invalid; govctl uses its last valid version "
        ), (args, result.stderr)
        assert f"(kept in {copy}, saved " in lines[0]
        assert lines[0].endswith("which running workers keep enforcing until the file is fixed:")
        assert lines[1] == f"warning: {error}"
    shown = json.loads(govctl("held", "show", held_id, "--json").stdout)
    assert shown["approved_by"] == ["alice"]
    # The copy is still the last valid version, and the file is still reported invalid.
    assert copy.read_text() == valid
    checked = govctl("policy", "check")
    assert checked.returncode == 5
    assert checked.stderr == f"error: {error}\n"
    status = govctl("policy", "status")
    assert status.returncode == 1
    assert "the policy file is invalid" in status.stderr

    # Without the copy: the file's errors, and why there is nothing to fall back on.
    copy.unlink()
    refused = govctl("held", "list")
    assert refused.returncode == 5
    assert refused.stderr == (
        f"error: {error}\nerror: (no last valid version to fall back on: {copy} does not exist)\n"
    )
