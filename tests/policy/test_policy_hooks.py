"""Pre-execution hooks: first deny wins, later hooks do not run, crashes deny, loading by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from governance.policy import (
    Action,
    ActionContext,
    ConfigError,
    HookDecision,
    Outcome,
    Policy,
    ToolCall,
    load_hook,
    run_hooks,
)
from governance.policy.hooks import HookLoadError

CTX = ActionContext(tenant="acme", agent="bot", run="r1")
ECHO = ToolCall(tool="echo")


def recorder(calls: list[str], name: str, result: HookDecision | None) -> Any:
    def hook(ctx: ActionContext, action: Action) -> HookDecision | None:
        calls.append(name)
        return result

    return hook


def test_no_hooks_allow() -> None:
    assert run_hooks([], CTX, ECHO).allowed


def test_all_allowing_hooks_allow_and_all_run() -> None:
    calls: list[str] = []
    hooks = [recorder(calls, "a", None), recorder(calls, "b", HookDecision.allow())]
    assert run_hooks(hooks, CTX, ECHO).allowed
    assert calls == ["a", "b"]


def test_first_deny_wins_and_later_hooks_do_not_run() -> None:
    calls: list[str] = []
    hooks = [
        recorder(calls, "a", None),
        recorder(calls, "b", HookDecision.deny("first")),
        recorder(calls, "c", HookDecision.deny("second")),
    ]
    decision = run_hooks(hooks, CTX, ECHO, names=["h0", "h1", "h2"])
    assert not decision.allowed
    assert decision.reason == "hook h1: first"
    assert decision.hook == "h1"
    assert calls == ["a", "b"]


def test_a_raising_hook_denies_naming_hook_and_exception() -> None:
    calls: list[str] = []

    def broken(ctx: ActionContext, action: Action) -> HookDecision | None:
        raise KeyError("rules")

    decision = run_hooks([broken, recorder(calls, "after", None)], CTX, ECHO)
    assert not decision.allowed
    assert decision.reason is not None
    assert "broken" in decision.reason
    assert "KeyError" in decision.reason
    assert "rules" in decision.reason
    assert calls == []


def test_a_hook_returning_something_else_denies() -> None:
    def sloppy(ctx: ActionContext, action: Action) -> Any:
        return True

    decision = run_hooks([sloppy], CTX, ECHO, names=["sloppy"])
    assert not decision.allowed
    assert decision.reason == "hook sloppy returned bool, not HookDecision or None"


def test_hook_decision_constructors() -> None:
    assert HookDecision.allow().allowed
    deny = HookDecision.deny("nope")
    assert (deny.allowed, deny.reason) == (False, "nope")


def test_load_hook_imports_module_attribute(sample_hooks: Any) -> None:
    hook = load_hook("policy_sample_hooks:deny_shell")
    assert hook is sample_hooks.deny_shell
    assert load_hook("policy_sample_hooks:Checks.allow") is sample_hooks.Checks.allow


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("policy_sample_hooks", "package.module:attribute"),
        ("policy_sample_hooks:", "package.module:attribute"),
        ("no_such_module_xyz:hook", "cannot import module 'no_such_module_xyz'"),
        ("policy_sample_hooks:missing", "'missing' not found"),
        ("policy_sample_hooks:NOT_CALLABLE", "is not callable"),
    ],
)
def test_load_hook_rejects_bad_specs(sample_hooks: Any, spec: str, message: str) -> None:
    with pytest.raises(HookLoadError, match=message):
        load_hook(spec)


def test_hooks_from_config_first_deny_wins_and_later_ones_do_not_run(
    sample_hooks: Any, make_policy: Callable[..., Policy]
) -> None:
    policy = make_policy(
        defaults={"hooks": ["policy_sample_hooks:allow_all"]},
        acme={
            "hooks": [
                "policy_sample_hooks:Checks.allow",
                "policy_sample_hooks:deny_shell",
                "policy_sample_hooks:deny_everything",
            ]
        },
    )
    decision = policy.authorize(CTX, ToolCall(tool="shell"))
    assert decision.outcome is Outcome.deny
    assert decision.rule == "tenants.acme.hooks[1]"
    assert decision.reason == "hook tenants.acme.hooks[1]: no shell for bot"
    assert sample_hooks.CALLS == ["allow_all", "Checks.allow", "deny_shell"]


def test_raising_hook_from_config_denies(
    sample_hooks: Any, make_policy: Callable[..., Policy]
) -> None:
    policy = make_policy(defaults={"hooks": ["policy_sample_hooks:explode"]})
    decision = policy.authorize(CTX, ECHO)
    assert decision.outcome is Outcome.deny
    assert decision.rule == "defaults.hooks[0]"
    assert "RuntimeError" in decision.reason
    assert "hook backend down" in decision.reason


def test_hooks_do_not_run_for_actions_already_denied(
    sample_hooks: Any, make_policy: Callable[..., Policy]
) -> None:
    policy = make_policy(acme={"hooks": ["policy_sample_hooks:allow_all"]})
    assert policy.authorize(CTX, ToolCall(tool="delete_file")).outcome is Outcome.deny
    assert sample_hooks.CALLS == []


def test_a_bad_hook_path_is_a_config_error(
    sample_hooks: Any, make_policy: Callable[..., Policy]
) -> None:
    with pytest.raises(ConfigError) as info:
        make_policy(acme={"hooks": ["policy_sample_hooks:allow_all", "no_such_module_xyz:h"]})
    assert info.value.errors[0][0] == "tenants.acme.hooks[1]"
    assert "<dict>: tenants.acme.hooks[1]: cannot import module" in str(info.value)


def test_a_malformed_hook_spec_is_a_config_error(make_policy: Callable[..., Policy]) -> None:
    with pytest.raises(ConfigError, match=r"tenants\.acme\.hooks\[0\]: a hook is written"):
        make_policy(acme={"hooks": ["not a spec"]})
