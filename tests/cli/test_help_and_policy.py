"""govctl without Redis: help, exit codes, and the policy commands (check, explain)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from governance.policy.signing import new_private_key, public_key_text
from tests.cli.conftest import CONFIG, ROOT, run_govctl, run_govctl_process


def test_help_lists_the_commands_and_the_exit_codes() -> None:
    result = run_govctl("--help")
    assert result.returncode == 0, result.stderr
    for command in ("held", "submit", "usage", "audit", "policy"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout
    for code, meaning in (
        ("0", "ok"),
        ("1", "refused"),
        ("2", "usage error"),
        ("3", "state Redis"),
        ("4", "audit verification failed"),
        ("5", "invalid configuration"),
        ("6", "broker"),
    ):
        assert any(
            line.strip().lstrip("•- ").startswith(f"{code}:") and meaning in line
            for line in result.stdout.splitlines()
        ), (code, result.stdout)


def test_group_help_lists_subcommands() -> None:
    held = run_govctl("held", "--help")
    assert held.returncode == 0
    for command in ("list", "show", "approve", "reject", "expire"):
        assert command in held.stdout
    assert "--key" in run_govctl("held", "approve", "--help").stdout
    assert "tool" in run_govctl("submit", "--help").stdout
    assert "verify" in run_govctl("audit", "--help").stdout
    assert "explain" in run_govctl("policy", "--help").stdout


def test_a_usage_error_exits_2_without_a_traceback() -> None:
    result = run_govctl_process("held", "reject", "some-id")  # --reason is required
    assert result.returncode == 2
    assert "--reason" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_policy_check_import_neither_celery_nor_redis() -> None:
    probe = (
        "import sys\n"
        "from governance.cli.main import main\n"
        "for argv in (['--help'], ['policy', 'check', sys.argv[1]]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'redis'})\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _reviewed_example() -> dict[str, Any]:
    """The shipped example with acme's reviewers added, as its comments say: three keys made
    with ``govctl reviewers keygen`` (their private halves stay with the test)."""
    data: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    data["tenants"]["acme"]["reviewers"] = {
        name: public_key_text(new_private_key().public_key()) for name in ("alice", "bob", "carol")
    }
    return data


def _written(data: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_policy_check_summarizes_the_example_config(tmp_path: Path) -> None:
    result = run_govctl("policy", "check", "config/governance.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    for name in ("acme", "beta", "echo", "write_file", "shell", "process.exec", "fake"):
        assert name in result.stdout
    summary = json.loads(run_govctl("policy", "check", str(CONFIG), "--json").stdout)
    assert set(summary["tenants"]) == {"acme", "beta"}
    assert summary["tools"]["shell"] == "process.exec"
    assert summary["tenants"]["acme"]["approval"]["quorum"] == 2
    # No example reviewer keys (nobody would hold their private halves): it says what is
    # missing until an operator adds theirs.
    assert summary["tenants"]["acme"]["reviewers"] == []
    assert "ed25519:" not in "".join(
        line.split("#", 1)[0] for line in CONFIG.read_text().splitlines()
    )
    assert [(w["kind"], w["tenant"]) for w in summary["warnings"]] == [
        ("no_reviewers", "acme"),
        ("cost_alert_without_reviewers", "acme"),
    ]
    # With reviewers added as its comments say, it checks clean.
    reviewed = json.loads(
        run_govctl("policy", "check", str(_written(_reviewed_example(), tmp_path)), "--json").stdout
    )
    assert reviewed["tenants"]["acme"]["reviewers"] == ["alice", "bob", "carol"]
    assert reviewed["warnings"] == [], "the example with its reviewers must check clean"


def test_policy_check_uses_the_configured_file_by_default() -> None:
    result = run_govctl("policy", "check", env={"GOVERNANCE_CONFIG_PATH": str(CONFIG)})
    assert result.returncode == 0, result.stderr
    assert str(CONFIG) in result.stdout


def test_a_malformed_policy_exits_5_naming_file_field_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = CONFIG.read_text().replace("concurrency: 3 ", "concurrency: -3 ")
    assert text != CONFIG.read_text()
    bad.write_text(text)
    result = run_govctl("policy", "check", str(bad))
    assert result.returncode == 5
    assert "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if "concurrency" in x)
    assert str(bad) in line
    assert "tenants.acme.concurrency" in line
    assert "greater than or equal to 0" in line


def test_a_missing_or_unparsable_policy_exits_5(tmp_path: Path) -> None:
    missing = run_govctl("policy", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 5
    assert "file not found" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ntenants: [\n")
    result = run_govctl("policy", "check", str(broken))
    assert result.returncode == 5
    assert str(broken) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("GOVERNANCE_STATE_REDIS_URL", "notaurl", "not a URL: it has no scheme"),
        ("GOVERNANCE_STATE_REDIS_URL", "http://127.0.0.1:1/0", "unsupported URL scheme http://"),
        ("GOVERNANCE_BROKER_URL", "redis://:s3cret@127.0.0.1:port/0", "its port is not a number"),
        ("GOVERNANCE_BROKER_URL", "http://x", "unsupported URL scheme http://"),
        ("GOVERNANCE_RESULT_BACKEND", "redis://127.0.0.1:x/1", "its port is not a number"),
    ],
)
def test_a_malformed_url_setting_exits_5_naming_the_variable(
    variable: str, value: str, reason: str
) -> None:
    result = run_govctl_process("status", env={variable: value})
    assert result.returncode == 5
    assert "Traceback" not in result.stderr
    assert f"error: invalid settings: {variable}: {reason}" in result.stderr
    assert "s3cret" not in result.stderr  # a URL's password is never repeated


def test_a_file_the_command_cannot_write_is_an_error_line_not_a_traceback(tmp_path: Path) -> None:
    where = tmp_path / "missing-dir" / "alice.key"
    result = run_govctl("reviewers", "keygen", "alice", "--out", str(where))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: No such file or directory: {where}" in result.stderr


def _explain(*args: str, config: Path = CONFIG) -> dict[str, object]:
    result = run_govctl("policy", "explain", "--config", str(config), *args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_explain_shell_for_acme_is_held_by_the_defaults_tier() -> None:
    decision = _explain("--tenant", "acme", "--agent", "planner", "--action", "shell")
    assert decision["outcome"] == "hold"
    assert decision["tier"] == "act_with_approval"
    assert decision["rule"] == "defaults.tiers.actions.process.exec"
    table = run_govctl(
        "policy", "explain", "-c", str(CONFIG), "-t", "acme", "-a", "planner", "-x", "shell"
    )
    assert table.returncode == 0
    assert "hold" in table.stdout
    assert "defaults.tiers.actions.process.exec" in table.stdout


def test_explain_researcher_is_shadowed() -> None:
    decision = _explain("--tenant", "acme", "--agent", "researcher", "--action", "echo")
    assert decision["outcome"] == "shadow"
    assert decision["rule"] == "tenants.acme.tiers.agents.researcher"


def test_explain_an_unknown_tool_is_denied() -> None:
    decision = _explain("--tenant", "acme", "--agent", "planner", "--action", "rm_rf")
    assert decision["outcome"] == "deny"
    assert decision["rule"] == "tools"
    assert "unknown tool 'rm_rf'" in str(decision["reason"])


def test_explain_other_decisions() -> None:
    intern = _explain("-t", "acme", "-a", "intern-joe", "-x", "write_file")
    assert (intern["outcome"], intern["rule"]) == ("deny", "tenants.acme.deny[0]")
    granted = _explain("-t", "acme", "-a", "ops-bot", "-x", "shell")
    assert (granted["outcome"], granted["rule"], granted["granted"]) == ("allow", "grant", True)
    llm = _explain("-t", "beta", "-a", "bot", "-x", "llm:openai")
    assert llm["outcome"] == "allow"
    assert llm["action_class"] == "llm.call"
    not_allowed = _explain("-t", "acme", "-a", "bot", "-x", "openai")
    assert (not_allowed["outcome"], not_allowed["rule"]) == (
        "deny",
        "tenants.acme.allowed_providers",
    )
    unknown_tenant = _explain("-t", "nobody", "-a", "bot", "-x", "echo")
    assert (unknown_tenant["outcome"], unknown_tenant["rule"]) == ("deny", "tenants")


def _warning_policy(tmp_path: Path, **acme: object) -> Path:
    """The example policy with its reviewers, acme's settings changed by ``acme``."""
    data = _reviewed_example()
    data["tenants"]["acme"].update(acme)
    return _written(data, tmp_path)


def _check(path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, object]]]:
    result = run_govctl("policy", "check", str(path))
    assert result.returncode == 0, result.stderr  # warnings alone exit 0
    as_json = run_govctl("policy", "check", str(path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    warnings: list[dict[str, object]] = json.loads(as_json.stdout)["warnings"]
    return result, warnings


def test_policy_check_warns_about_a_quorum_a_reviewer_can_never_meet(tmp_path: Path) -> None:
    """Quorum 2, exactly two reviewers, no self-approval: alice's own requests (and bob's) can
    collect one approval at most."""
    reviewers = _reviewed_example()["tenants"]["acme"]["reviewers"]
    two = {name: reviewers[name] for name in ("alice", "bob")}
    result, warnings = _check(_warning_policy(tmp_path, reviewers=two))
    assert [(w["kind"], w["tenant"], w["reviewer"]) for w in warnings] == [
        ("quorum_unreachable", "acme", "alice"),
        ("quorum_unreachable", "acme", "bob"),
    ]
    lines = [x for x in result.stderr.splitlines() if x.startswith("warning: ")]
    assert len(lines) == 2
    assert (
        "tenant 'acme': an action requested by reviewer 'alice' can never be released" in (lines[0])
    )
    assert "2 warning(s)" in result.stdout
    # Allowed to approve their own requests, or a quorum of 1: nothing to warn about.
    assert _check(_warning_policy(tmp_path, reviewers=two, approval={"quorum": 1}))[1] == []
    allowed = {"quorum": 2, "allow_self_approval": True}
    assert _check(_warning_policy(tmp_path, reviewers=two, approval=allowed))[1] == []


def test_policy_check_warns_when_held_actions_have_no_reviewers(tmp_path: Path) -> None:
    """beta may run shell (approval tier for every tenant) but nobody may release it."""
    data = _reviewed_example()
    data["tenants"]["beta"]["allowed_tools"] = [*data["tenants"]["beta"]["allowed_tools"], "shell"]
    data["tenants"]["beta"].pop("reviewers", None)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result, warnings = _check(path)
    assert [(w["kind"], w["tenant"]) for w in warnings] == [("no_reviewers", "beta")]
    assert "tenant 'beta' holds actions for approval but has no reviewers" in result.stderr


def test_policy_check_warns_about_a_cost_alert_nobody_can_approve(tmp_path: Path) -> None:
    """beta has no reviewers; with the standard preset's $5 cost alert back, a run that
    reaches it would be held for nobody."""
    data = _reviewed_example()
    data["tenants"]["beta"]["long_running"] = "standard"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result, warnings = _check(path)
    assert [(w["kind"], w["tenant"], w["path"]) for w in warnings] == [
        ("cost_alert_without_reviewers", "beta", "tenants.beta.long_running.cost_alert_usd")
    ]
    assert "tenant 'beta' has a cost alert of $5 per run" in result.stderr


def test_policy_check_warns_about_grants_that_expired_or_expire_soon(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    grants = [
        {"agent": "ops-bot", "action": "shell", "until": (now - timedelta(days=1)).isoformat()},
        {"agent": "ci-bot", "action": "shell", "until": (now + timedelta(days=10)).isoformat()},
        {"agent": "far-bot", "action": "shell", "until": (now + timedelta(days=90)).isoformat()},
    ]
    result, warnings = _check(_warning_policy(tmp_path, grants=grants))
    assert [(w["kind"], w["path"]) for w in warnings] == [
        ("grant_expired", "tenants.acme.grants[0]"),
        ("grant_expires_soon", "tenants.acme.grants[1]"),
    ]
    assert "grant of 'shell' to agent 'ops-bot' of tenant 'acme' expired at" in result.stderr
    assert "grant of 'shell' to agent 'ci-bot' of tenant 'acme' expires at" in result.stderr
    assert "far-bot" not in result.stderr
