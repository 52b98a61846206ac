"""The shipped example, the config version, effective tenant settings, prices and usage."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from governance.policy import (
    PRESETS,
    ActionContext,
    LLMCall,
    LongRunningLimits,
    Message,
    Outcome,
    Policy,
    RetryPolicy,
    ToolCall,
    Usage,
)
from tests.policy.conftest import ALICE_KEY, BOB_KEY

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "governance.yaml"


def test_shipped_example_loads() -> None:
    policy = Policy.from_file(EXAMPLE)
    acme = policy.tenant("acme")
    assert acme is not None
    assert list(acme.reviewers) == []  # no example keys: a deployment adds its own
    assert acme.approval.quorum == 2
    assert acme.approval.expiry == timedelta(hours=24)  # merged from defaults
    assert acme.concurrency == 3
    assert acme.long_running == replace(
        PRESETS["extended"], max_wall_time_s=14400, cost_alert_usd=20
    )
    assert acme.run_concurrency == 2
    assert acme.step_timeout == timedelta(minutes=5)  # from defaults
    http_get = ToolCall(tool="http_get", input={"url": "https://example.com"})
    assert policy.step_timeout(acme, http_get) == timedelta(seconds=30)  # the tool's own
    assert acme.rate_limits.tenant is not None
    assert acme.rate_limits.tenant.burst == 10
    assert acme.rate_limits.providers["fake"].burst == 5  # defaults to rate
    assert acme.retry == RetryPolicy(3, 200, 10_000, 0.2)
    assert policy.source == str(EXAMPLE)


def test_shipped_example_decides_as_its_comments_say() -> None:
    policy = Policy.from_file(EXAMPLE)

    def decide(agent: str, tool: str) -> Outcome:
        ctx = ActionContext(tenant="acme", agent=agent, run="r1", user="carol")
        return policy.authorize(ctx, ToolCall(tool=tool)).outcome

    assert decide("bot", "echo") is Outcome.allow
    assert decide("bot", "shell") is Outcome.hold
    assert decide("intern-1", "read_file") is Outcome.deny
    assert decide("untrusted-1", "echo") is Outcome.deny
    assert decide("researcher", "echo") is Outcome.shadow
    assert decide("researcher", "http_get") is Outcome.allow
    assert decide("bot", "delete_file") is Outcome.suggest  # tiers.actions.delete_file


def test_version_is_16_hex_and_stable_under_key_reordering(base_config: dict[str, Any]) -> None:
    reordered = {key: base_config[key] for key in reversed(list(base_config))}
    reordered["tools"] = dict(reversed(list(base_config["tools"].items())))
    v1 = Policy.from_dict(base_config).version
    assert len(v1) == 16
    assert int(v1, 16) >= 0
    assert Policy.from_dict(reordered).version == v1


def test_version_is_the_same_for_equivalent_spellings(base_config: dict[str, Any]) -> None:
    longhand = copy.deepcopy(base_config)
    longhand["tools"]["echo"] = {"class": "compute"}
    assert Policy.from_dict(longhand).version == Policy.from_dict(base_config).version


def test_version_changes_when_a_value_changes(base_config: dict[str, Any]) -> None:
    changed = copy.deepcopy(base_config)
    changed["tenants"]["acme"]["allowed_tools"].remove("shell")
    assert Policy.from_dict(changed).version != Policy.from_dict(base_config).version


def test_tenant_returns_none_for_unknown(make_policy: Callable[..., Policy]) -> None:
    assert make_policy().tenant("globex") is None


def test_builtin_values_when_nothing_is_configured(make_policy: Callable[..., Policy]) -> None:
    acme = make_policy().tenant("acme")
    assert acme is not None
    assert acme.concurrency is None
    assert acme.budgets == ()
    assert acme.long_running == PRESETS["standard"]
    assert acme.warning_threshold_pct == 80
    assert acme.approval.quorum == 1
    assert not acme.approval.allow_self_approval
    assert acme.retry == RetryPolicy(3, 200, 10_000, 0.2)
    assert acme.rate_limits.tenant is None
    assert acme.source("concurrency") == "built-in default"


def test_tenant_value_replaces_default_and_explicit_null_counts(
    make_policy: Callable[..., Policy],
) -> None:
    inherit = make_policy(defaults={"concurrency": 10}).tenant("acme")
    replace = make_policy(defaults={"concurrency": 10}, acme={"concurrency": 2}).tenant("acme")
    unlimited = make_policy(defaults={"concurrency": 10}, acme={"concurrency": None}).tenant("acme")
    assert inherit is not None
    assert replace is not None
    assert unlimited is not None
    assert (inherit.concurrency, inherit.source("concurrency")) == (10, "defaults.concurrency")
    assert (replace.concurrency, replace.source("concurrency")) == (2, "tenants.acme.concurrency")
    assert unlimited.concurrency is None


def test_allowed_networks_are_resolved_like_allowed_domains(
    make_policy: Callable[..., Policy],
) -> None:
    policy = make_policy(
        defaults={"allowed_networks": ["10.20.0.0/16"]},
        acme={"allowed_networks": ["127.0.0.0/8", "fd00::/8", "192.168.1.7"]},
    )
    acme = policy.tenant("acme")
    assert acme is not None
    assert acme.allowed_networks == (
        ip_network("127.0.0.0/8"),
        ip_network("fd00::/8"),
        ip_network("192.168.1.7/32"),
    )
    assert acme.source("allowed_networks") == "tenants.acme.allowed_networks"
    inherited = make_policy(defaults={"allowed_networks": ["10.20.0.0/16"]}).tenant("acme")
    assert inherited is not None
    assert inherited.allowed_networks == (ip_network("10.20.0.0/16"),)
    none = make_policy().tenant("acme")
    assert none is not None
    assert none.allowed_networks == ()


def test_approval_and_retry_merge_field_by_field_and_max_wait_is_replaced(
    make_policy: Callable[..., Policy],
) -> None:
    acme = make_policy(
        defaults={
            "approval": {"expiry": "2h", "allow_self_approval": True},
            "retry": {"max_retries": 5, "backoff_cap_ms": 1000},
            "max_wait": "10m",
        },
        acme={
            "reviewers": {"alice": ALICE_KEY, "bob": BOB_KEY},
            "approval": {"quorum": 2},
            "retry": {"backoff_cap_ms": None},
            "max_wait": "90s",
        },
    ).tenant("acme")
    assert acme is not None
    assert (acme.approval.quorum, acme.approval.expiry, acme.approval.allow_self_approval) == (
        2,
        timedelta(hours=2),
        True,
    )
    assert acme.retry == RetryPolicy(5, 200, None, 0.2)
    assert acme.max_wait == timedelta(seconds=90)


def test_long_running_preset_with_overrides(make_policy: Callable[..., Policy]) -> None:
    acme = make_policy(
        acme={
            "long_running": {"preset": "extended", "max_discovery_depth": 3, "idle_timeout_s": None}
        }
    ).tenant("acme")
    assert acme is not None
    assert acme.long_running == LongRunningLimits(300, 3, 50.0, None, 5, max_wall_time_s=86400)


def test_budget_lookup_by_period(make_policy: Callable[..., Policy]) -> None:
    acme = make_policy(
        acme={"budgets": [{"period": "day", "cost_usd": 5}, {"period": "run", "steps": 10}]}
    ).tenant("acme")
    assert acme is not None
    day, run = acme.budget("day"), acme.budget("run")
    assert day is not None
    assert day.cost_usd == 5.0
    assert run is not None
    assert run.steps == 10
    assert acme.budget("month") is None


def test_action_class(make_policy: Callable[..., Policy]) -> None:
    policy = make_policy()
    assert policy.action_class(ToolCall(tool="shell")) == "process.exec"
    assert policy.action_class(ToolCall(tool="unknown")) is None
    msg = [Message(role="user", content="x")]
    assert policy.action_class(LLMCall(provider="x", model="y", messages=msg, max_tokens=1)) == (
        "llm.call"
    )


def test_price_lookup(make_policy: Callable[..., Policy]) -> None:
    policy = make_policy()
    small = policy.price("fake", "fake-small")
    assert small is not None
    assert small.output_usd_per_mtok == 1.5
    fallback = policy.price("openai", "anything")
    assert fallback is not None
    assert fallback.input_usd_per_mtok == 1.0
    assert policy.price("fake", "unknown") is None
    assert policy.price("nobody", "m") is None


def test_estimate_usage_of_a_tool_call(make_policy: Callable[..., Policy]) -> None:
    usage = make_policy().estimate_usage(ToolCall(tool="echo", input={"text": "hi"}))
    assert usage == Usage(steps=1, tool_calls=1)
    assert usage.cost_micro_usd == 0
    assert usage.tokens == 0


def test_estimate_usage_of_an_llm_call_rounds_cost_up(make_policy: Callable[..., Policy]) -> None:
    call = LLMCall(
        provider="fake",
        model="fake-small",
        messages=[Message(role="user", content="012345678")],
        max_tokens=100,
    )
    usage = make_policy().estimate_usage(call)
    # input: 9 bytes + 8 (message) + 8 (call) = 25 tokens; cost 25 x 0.5 + 100 x 1.5 = 162.5
    # micro-USD -> 163
    assert (usage.steps, usage.tool_calls, usage.input_tokens, usage.output_tokens) == (
        1,
        0,
        25,
        100,
    )
    assert usage.tokens == 125
    assert usage.cost_micro_usd == 163
    assert usage.cost_usd == pytest.approx(0.000163)


def test_cost_is_exact_for_decimal_prices(make_policy: Callable[..., Policy]) -> None:
    policy = make_policy()
    # 100 x 0.15 is 15.000000000000002 in floating point; the micro-dollar cost must be 15.
    assert policy.cost_micro_usd("openai", "gpt-4o-mini", 100, 0) == 15
    assert policy.cost_usd("openai", "gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)


def test_cost_of_an_unpriced_model_is_an_error(make_policy: Callable[..., Policy]) -> None:
    with pytest.raises(ValueError, match="unknown model 'x' for provider 'fake'"):
        make_policy().cost_usd("fake", "x", 1, 1)


def test_usage_adds_up() -> None:
    total = Usage(1, 1, 0, 0, 0) + Usage(1, 0, 10, 20, 154)
    assert total == Usage(2, 1, 10, 20, 154)
    with pytest.raises(ValueError, match="steps"):
        Usage(steps=-1)
