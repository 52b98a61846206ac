"""A broken config raises ConfigError naming the file, the field path and the reason."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest

from governance.policy import ConfigError, Policy
from tests.policy.conftest import ALICE_KEY


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "governance.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD_YAML = """\
version: 1
tools:
  echo: compute
providers:
  fake:
    models:
      fake-small: {input_usd_per_mtok: 0.5, output_usd_per_mtok: 1.5}
tenants:
  acme:
    allowed_tools: [echo]
    concurrency: 3
"""


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Policy.from_file(path)
    error = info.value
    assert error.source == str(path)
    for line in str(error).splitlines():
        assert line.startswith(f"{path}: ")
    return error


def dict_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Policy.from_dict(data)
    return info.value


def test_the_good_yaml_loads(tmp_path: Path) -> None:
    assert Policy.from_file(write(tmp_path, GOOD_YAML)).tenant("acme") is not None


@pytest.mark.parametrize("value", ["no", "true", "yes", '"3"', "2.5"])
def test_a_count_is_an_integer_never_a_yaml_boolean_or_a_string(tmp_path: Path, value: str) -> None:
    error = load_error(tmp_path, GOOD_YAML.replace("concurrency: 3", f"concurrency: {value}"))
    assert error.errors[0][0] == "tenants.acme.concurrency"
    assert "valid integer" in error.errors[0][1]


@pytest.mark.parametrize(
    ("limit", "field"),
    [("{rate: true}", "rate"), ("{rate: 5, burst: 'yes'}", "burst"), ("{rate: '5'}", "rate")],
)
def test_rate_limit_numbers_are_strict(tmp_path: Path, limit: str, field: str) -> None:
    text = GOOD_YAML + f"    rate_limits:\n      tenant: {limit}\n"
    error = load_error(tmp_path, text)
    assert error.errors[0][0] == f"tenants.acme.rate_limits.tenant.{field}"


def test_wrong_type(tmp_path: Path) -> None:
    error = load_error(tmp_path, GOOD_YAML.replace("concurrency: 3", "concurrency: lots"))
    assert error.errors[0][0] == "tenants.acme.concurrency"
    assert "valid integer" in error.errors[0][1]
    assert f"{error.source}: tenants.acme.concurrency: " in str(error)
    assert "'lots'" in str(error)


def test_unknown_tier_name(tmp_path: Path) -> None:
    text = GOOD_YAML + "    tiers: {default: yolo}\n"
    error = load_error(tmp_path, text)
    assert error.errors == [
        (
            "tenants.acme.tiers.default",
            "Input should be 'act_auto', 'act_with_approval', 'suggest' or 'shadow' (got 'yolo')",
        )
    ]


def test_unknown_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, GOOD_YAML + "    max_workers: 4\n")
    path, reason = error.errors[0]
    assert path == "tenants.acme.max_workers"
    assert "Extra inputs are not permitted" in reason
    assert f"{error.source}: tenants.acme.max_workers: Extra inputs" in str(error)


def test_negative_limit(tmp_path: Path) -> None:
    error = load_error(tmp_path, GOOD_YAML.replace("concurrency: 3", "concurrency: -1"))
    assert error.errors[0][0] == "tenants.acme.concurrency"
    assert "greater than or equal to 0" in error.errors[0][1]


def test_negative_budget_limit_path_has_the_list_index(tmp_path: Path) -> None:
    text = GOOD_YAML + (
        "    budgets:\n      - {period: day, tokens: 100}\n      - {period: run, steps: -5}\n"
    )
    error = load_error(tmp_path, text)
    assert error.errors[0][0] == "tenants.acme.budgets[1].steps"
    assert "tenants.acme.budgets[1].steps: Input should be greater than or equal to 0" in str(error)


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    error = load_error(tmp_path, "version: 1\ntools:\n  echo: [compute\n")
    ((where, reason),) = error.errors
    assert where.split(":")[0].isdigit()
    assert ":" in where
    assert reason
    assert str(error).startswith(f"{error.source}: {where}: ")


def test_bad_yaml_location_is_one_based_line_and_column(tmp_path: Path) -> None:
    error = load_error(tmp_path, "version: 1\nfoo: bar: baz\n")
    assert error.errors == [("2:9", "mapping values are not allowed here")]
    assert str(error) == f"{error.source}: 2:9: mapping values are not allowed here"


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = GOOD_YAML + "  acme:\n    allowed_tools: []\n"
    error = load_error(tmp_path, text)
    assert "duplicate key 'acme'" in error.errors[0][1]


def test_unknown_tool_in_allowed_tools(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, GOOD_YAML.replace("allowed_tools: [echo]", "allowed_tools: [echo, rm]")
    )
    assert error.errors == [
        ("tenants.acme.allowed_tools[1]", "unknown tool 'rm' (not declared in tools)")
    ]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        Policy.from_file(missing)
    assert info.value.source == str(missing)
    assert str(info.value) == f"{missing}: file not found"


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("", "nothing"), ("42\n", "int")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    error = load_error(tmp_path, text)
    assert "top level must be a mapping" in str(error)
    assert kind in str(error)


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    text = GOOD_YAML.replace("concurrency: 3", "concurrency: -1\n    bogus: 1")
    error = load_error(tmp_path, text)
    assert [path for path, _ in error.errors] == ["tenants.acme.concurrency", "tenants.acme.bogus"]
    assert len(str(error).splitlines()) == 2


def test_config_error_survives_pickle(tmp_path: Path) -> None:
    error = load_error(tmp_path, GOOD_YAML.replace("concurrency: 3", "concurrency: -1"))
    back = pickle.loads(pickle.dumps(error))
    assert (back.source, back.errors, str(back)) == (error.source, error.errors, str(error))


BASE: dict[str, Any] = {
    "version": 1,
    "tools": {"echo": "compute", "shell": "process.exec"},
    "providers": {"fake": {"models": {"m": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 1}}}},
    "tenants": {"acme": {"allowed_tools": ["echo"], "allowed_providers": ["fake"]}},
}


def with_acme(**settings: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["tenants"]["acme"].update(settings)
    return data


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({**BASE, "version": 2}, "version", "Input should be 1"),
        (
            with_acme(allowed_providers=["openai"]),
            "tenants.acme.allowed_providers[0]",
            "unknown provider 'openai'",
        ),
        (
            with_acme(tiers={"actions": {"rm": "suggest"}}),
            "tenants.acme.tiers.actions.rm",
            "unknown action 'rm'",
        ),
        (
            with_acme(tiers={"agent_actions": {"bot": {"fs.nuke": "shadow"}}}),
            "tenants.acme.tiers.agent_actions.bot.fs.nuke",
            "unknown action 'fs.nuke'",
        ),
        (with_acme(deny=[{"action": "rm"}]), "tenants.acme.deny[0].action", "unknown action 'rm'"),
        (
            with_acme(grants=[{"agent": "a", "action": "rm", "until": "2030-01-01T00:00:00Z"}]),
            "tenants.acme.grants[0].action",
            "unknown action 'rm'",
        ),
        (
            with_acme(grants=[{"agent": "a", "action": "echo", "until": "2030-01-01T00:00:00"}]),
            "tenants.acme.grants[0].until",
            "timezone",
        ),
        (
            with_acme(budgets=[{"period": "week", "tokens": 1}]),
            "tenants.acme.budgets[0].period",
            "'run', 'day' or 'month'",
        ),
        (with_acme(budgets=[{"period": "day"}]), "tenants.acme.budgets[0]", "at least one of"),
        (
            with_acme(budgets=[{"period": "day", "tokens": 1}, {"period": "day", "steps": 1}]),
            "tenants.acme.budgets[1].period",
            "a second budget for period 'day'",
        ),
        (
            with_acme(rate_limits={"tenant": {"rate": 0}}),
            "tenants.acme.rate_limits.tenant.rate",
            "greater than or equal to 1",
        ),
        (
            with_acme(rate_limits={"tenant": {"rate": 1, "per": "soon"}}),
            "tenants.acme.rate_limits.tenant.per",
            "not a duration",
        ),
        (
            with_acme(rate_limits={"providers": {"openai": {"rate": 1}}}),
            "tenants.acme.rate_limits.providers.openai",
            "unknown provider",
        ),
        (
            with_acme(approval={"quorum": 0}),
            "tenants.acme.approval.quorum",
            "greater than or equal to 1",
        ),
        (with_acme(approval={"expiry": "0s"}), "tenants.acme.approval.expiry", "longer than 0"),
        (
            with_acme(reviewers={"alice": ALICE_KEY}, approval={"quorum": 2}),
            "tenants.acme.approval.quorum",
            "quorum 2 needs more reviewers",
        ),
        (
            with_acme(reviewers=["alice", "bob"]),
            "tenants.acme.reviewers",
            "listed with the public halves of their keys",
        ),
        (
            with_acme(reviewers={"alice": "ed25519:not-base64!"}),
            "tenants.acme.reviewers.alice",
            "not valid base64",
        ),
        (
            with_acme(reviewers={"alice": "ed25519:AAAA"}),
            "tenants.acme.reviewers.alice",
            "32 bytes, this one is 3",
        ),
        (
            with_acme(reviewers={"alice": "rsa:AAAA"}),
            "tenants.acme.reviewers.alice",
            "written 'ed25519:<base64>'",
        ),
        (
            with_acme(approval={"max_grant": "0s"}),
            "tenants.acme.approval.max_grant",
            "longer than 0",
        ),
        (
            with_acme(notify=[{"kind": "email", "url": "https://x"}]),
            "tenants.acme.notify[0].kind",
            "'webhook' or 'slack'",
        ),
        (
            with_acme(retry={"backoff_base_ms": 500, "backoff_cap_ms": 100}),
            "tenants.acme.retry",
            "backoff_cap_ms (100) must be >= backoff_base_ms (500)",
        ),
        (
            with_acme(retry={"jitter_ratio": 2}),
            "tenants.acme.retry.jitter_ratio",
            "less than or equal to 1",
        ),
        (
            with_acme(long_running="forever"),
            "tenants.acme.long_running.preset",
            "unknown preset 'forever'",
        ),
        (
            with_acme(allowed_networks=["10.0.0.0/8", "10.0.0.1/8"]),
            "tenants.acme.allowed_networks[1]",
            "not a network in CIDR notation, like 10.0.0.0/8 or fd00::/8 (got '10.0.0.1/8': "
            "10.0.0.1/8 has host bits set)",
        ),
        (
            with_acme(allowed_networks=["intranet"]),
            "tenants.acme.allowed_networks[0]",
            "not a network in CIDR notation",
        ),
        (
            with_acme(allowed_networks=["10.0.0.0/33"]),
            "tenants.acme.allowed_networks[0]",
            "got '10.0.0.0/33'",
        ),
        (
            with_acme(allowed_networks=[10]),
            "tenants.acme.allowed_networks[0]",
            "a network is written as a string",
        ),
        (
            with_acme(warning_threshold_pct=101),
            "tenants.acme.warning_threshold_pct",
            "less than or equal to 100",
        ),
        ({**BASE, "tenants": {"bad tenant": {}}}, "tenants.bad tenant", "invalid name"),
        (
            {**BASE, "providers": {"fake": {"rate_limit": {"rate": 5, "per": "1s"}}}},
            "providers.fake",
            "a provider-wide rate_limit needs `scope: deployment`",
        ),
        (
            {**BASE, "providers": {"fake": {"scope": "everyone"}}},
            "providers.fake.scope",
            "'tenant' or 'deployment'",
        ),
        ({**BASE, "tools": {"echo": "llm.call"}}, "tools.echo.class", "reserved for LLM calls"),
        (
            {**BASE, "tools": {"echo": "compute", "fake": "compute"}},
            "providers.fake",
            "both a tool and a provider",
        ),
        (
            {
                **BASE,
                "providers": {
                    "fake": {"models": {"m": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}}}
                },
            },
            "providers.fake.models.m.input_usd_per_mtok",
            "greater than or equal to 0",
        ),
    ],
)
def test_invalid_settings_name_path_and_reason(
    data: dict[str, Any], path: str, reason: str
) -> None:
    error = dict_error(data)
    assert error.source == "<dict>"
    matching = [r for p, r in error.errors if p == path]
    assert matching, f"no error at {path}: {error.errors}"
    assert reason in matching[0]
    assert f"<dict>: {path}: " in str(error)


def test_deny_rule_globs_need_not_name_a_known_action() -> None:
    assert Policy.from_dict(with_acme(deny=[{"action": "net*"}, {"agent": "x-*"}])) is not None


def test_retry_cap_below_a_base_inherited_from_defaults_is_caught() -> None:
    data = with_acme(retry={"backoff_cap_ms": 100})
    data["defaults"] = {"retry": {"backoff_base_ms": 300}}
    error = dict_error(data)
    assert error.errors[0][0] == "tenants.acme.retry"
    assert "after merging defaults" in error.errors[0][1]


def test_a_problem_in_defaults_is_reported_once() -> None:
    data = copy.deepcopy(BASE)
    data["tenants"]["beta"] = {}
    data["defaults"] = {"hooks": ["no_such_module_xyz:hook"]}
    error = dict_error(data)
    assert [p for p, _ in error.errors] == ["defaults.hooks[0]"]


def test_one_key_under_two_reviewer_names_is_an_error_naming_both(tmp_path: Path) -> None:
    text = GOOD_YAML + f'    reviewers: {{alice: "{ALICE_KEY}", alias: "{ALICE_KEY}"}}\n'
    error = load_error(tmp_path, text)
    assert "tenants.acme.reviewers: alias and alice are listed with the same key" in str(error)


def test_a_release_valid_for_shorter_than_the_wait_and_retries_is_an_error(
    tmp_path: Path,
) -> None:
    text = GOOD_YAML + (
        "    max_wait: 2h\n"
        "    retry: {max_retries: 2, backoff_base_ms: 1000, jitter_ratio: 0.5}\n"
        "    approval: {valid_for: 1h}\n"
    )
    error = load_error(tmp_path, text)
    assert (
        "tenants.acme.approval.valid_for: valid_for (1:00:00) is shorter than max_wait (2:00:00) "
        "plus the retry budget (0:00:05)"
    ) in str(error)
    fixed = text.replace("valid_for: 1h", "valid_for: 3h")
    assert Policy.from_file(write(tmp_path, fixed)).tenant("acme") is not None


def test_a_release_valid_longer_than_the_ledger_remembers_a_task_is_an_error(
    tmp_path: Path,
) -> None:
    text = GOOD_YAML + "    approval: {valid_for: 7d, expiry: 1d}\n"
    error = load_error(tmp_path, text)
    assert "longer than the 7 days the ledger remembers an ended task" in str(error)
