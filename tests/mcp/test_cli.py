"""``govctl mcp``: tokens are printed once and stored hashed, listed and removed; ``tools``
shows what an agent would list; ``serve`` refuses what cannot work; and ``govctl --help``
(``mcp`` included) imports neither the MCP SDK nor Celery nor redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from governance.mcp.tokens import TokenFile, token_hash
from tests.govctl_runner import ROOT, run_govctl

CONFIG = ROOT / "config" / "governance.yaml"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Settings that need no Redis: the commands below never connect."""
    return {
        "GOVERNANCE_CONFIG_PATH": str(CONFIG),
        "GOVERNANCE_WORKSPACE_DIR": str(tmp_path / "workspace"),
        "GOVERNANCE_BROKER_URL": "redis://127.0.0.1:9/0",
        "GOVERNANCE_STATE_REDIS_URL": "redis://127.0.0.1:9/1",
        "GOVERNANCE_AUDIT_KEY": "mcp-cli-test-key",
        "GOVERNANCE_MCP_TOKENS": str(tmp_path / "tokens.json"),
    }


def test_a_token_is_printed_once_stored_hashed_listed_and_removed(
    env: dict[str, str], tmp_path: Path
) -> None:
    added = run_govctl("mcp", "token", "add", "-t", "acme", "-a", "planner", "-u", "carol", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("gmcp_")
    assert "shown this once" in added.stderr
    stored = (tmp_path / "tokens.json").read_text()
    assert token not in stored
    assert token_hash(token) in stored
    found = TokenFile(tmp_path / "tokens.json").lookup(token)
    assert found is not None
    assert (found.tenant, found.agent, found.user) == ("acme", "planner", "carol")

    listed = json.loads(run_govctl("mcp", "token", "list", "--json", env=env).stdout)
    assert [(t["tenant"], t["agent"], t["user"]) for t in listed["tokens"]] == [
        ("acme", "planner", "carol")
    ]
    token_id = listed["tokens"][0]["id"]
    assert token_hash(token).startswith(token_id)
    assert token not in json.dumps(listed)

    removed = run_govctl("mcp", "token", "remove", token_id, "--json", env=env)
    assert removed.returncode == 0, removed.stderr
    assert TokenFile(tmp_path / "tokens.json").lookup(token) is None
    again = run_govctl("mcp", "token", "remove", token_id, env=env)
    assert again.returncode == 1
    assert "no token with id" in again.stderr


def test_token_add_refuses_an_unknown_tenant_or_no_file(env: dict[str, str]) -> None:
    unknown = run_govctl("mcp", "token", "add", "-t", "nosuch", "-a", "planner", env=env)
    assert unknown.returncode == 1
    assert "unknown tenant 'nosuch'" in unknown.stderr
    no_file = {k: v for k, v in env.items() if k != "GOVERNANCE_MCP_TOKENS"}
    missing = run_govctl("mcp", "token", "add", "-t", "acme", "-a", "planner", env=no_file)
    assert missing.returncode == 2
    assert "--tokens" in missing.stderr


def test_tools_shows_what_an_agent_would_list(env: dict[str, str]) -> None:
    shown = run_govctl(
        "mcp", "tools", "-t", "acme", "-a", "planner", "-u", "carol", "--json", env=env
    )
    assert shown.returncode == 0, shown.stderr
    tools = {t["name"]: t for t in json.loads(shown.stdout)["tools"]}
    assert set(tools) == {"echo", "http_get", "read_file", "write_file", "delete_file", "shell"}
    assert tools["shell"]["tier"] == "act_with_approval"
    assert tools["delete_file"]["tier"] == "suggest"
    assert tools["echo"]["input_schema"]["required"] == ["text"]
    intern = run_govctl("mcp", "tools", "-t", "acme", "-a", "intern-joe", env=env)
    assert intern.returncode == 0, intern.stderr
    assert "not listed (denied outright)" in intern.stderr


def test_serve_refuses_what_cannot_work(env: dict[str, str], tmp_path: Path) -> None:
    no_agent = run_govctl("mcp", "serve", "-t", "acme", env=env)
    assert no_agent.returncode == 2
    assert "--tenant and --agent" in no_agent.stderr
    (tmp_path / "tokens.json").write_text('{"tokens": {}}')
    no_tokens = run_govctl("mcp", "serve", "--transport", "http", env=env)
    assert no_tokens.returncode == 1
    assert "every request would be refused" in no_tokens.stderr
    bound = run_govctl("mcp", "serve", "--transport", "http", "-t", "acme", env=env)
    assert bound.returncode == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    refused = run_govctl("mcp", "token", "list", "--tokens", str(broken), env=env)
    assert refused.returncode == 5
    assert "not JSON" in refused.stderr


def test_help_imports_neither_the_sdk_nor_celery_nor_redis(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from governance.cli.main import main\n"
        "for argv in (['--help'], ['mcp', '--help'], ['mcp', 'serve', '--help'],\n"
        "             ['mcp', 'token', 'list', '--tokens', sys.argv[1]]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "found = sorted(loaded & {'celery', 'kombu', 'redis', 'mcp', 'mcp_types', 'uvicorn'})\n"
        "assert not found, found\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "tokens.json")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_serve_without_the_sdk_says_how_to_install_it(env: dict[str, str]) -> None:
    probe = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mcp':\n"
        "            raise ImportError('not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from governance.cli.main import main\n"
        "main(['mcp', 'serve', '-t', 'acme', '-a', 'planner'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 5
    assert "pip install 'celery-governance[mcp]'" in result.stderr
