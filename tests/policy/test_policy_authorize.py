"""Authorization before tiers: tenants, unknown actions, allow-lists and deny rules."""

from __future__ import annotations

from collections.abc import Callable

from governance.policy import ActionContext, LLMCall, Outcome, Policy, ToolCall


def test_unknown_tenant_is_denied(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(ctx(tenant="globex"), ToolCall(tool="echo"))
    assert decision.outcome is Outcome.deny
    assert "unknown tenant 'globex'" in decision.reason
    assert decision.tier is None


def test_unknown_tool_is_denied_naming_it(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy(acme={"allowed_tools": ["*"]}).authorize(ctx(), ToolCall(tool="rm_rf"))
    assert decision.outcome is Outcome.deny
    assert "unknown tool 'rm_rf'" in decision.reason
    assert (decision.rule, decision.action_class, decision.tier) == ("tools", None, None)


def test_unknown_provider_is_denied_naming_it(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    llm_call: Callable[..., LLMCall],
) -> None:
    decision = make_policy(acme={"allowed_providers": ["*"]}).authorize(
        ctx(), llm_call("anthropic", "claude")
    )
    assert decision.outcome is Outcome.deny
    assert "unknown provider 'anthropic'" in decision.reason
    assert decision.rule == "providers"


def test_model_without_a_price_is_denied(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    llm_call: Callable[..., LLMCall],
) -> None:
    decision = make_policy().authorize(ctx(), llm_call("fake", "fake-huge"))
    assert decision.outcome is Outcome.deny
    assert "unknown model 'fake-huge' for provider 'fake'" in decision.reason


def test_model_without_a_price_is_allowed_with_a_default_price(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    llm_call: Callable[..., LLMCall],
) -> None:
    decision = make_policy().authorize(ctx(), llm_call("openai", "gpt-5"))
    assert decision.outcome is Outcome.allow
    assert decision.action_class == "llm.call"


def test_tool_outside_the_allow_list_is_denied(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(ctx(), ToolCall(tool="delete_file"))
    assert decision.outcome is Outcome.deny
    assert decision.reason == "tool 'delete_file' is not allowed for tenant 'acme'"
    assert decision.rule == "tenants.acme.allowed_tools"
    assert decision.action_class == "fs.delete"


def test_provider_outside_the_allow_list_is_denied(
    make_policy: Callable[..., Policy],
    ctx: Callable[..., ActionContext],
    llm_call: Callable[..., LLMCall],
) -> None:
    decision = make_policy(acme={"allowed_providers": ["fake"]}).authorize(
        ctx(), llm_call("openai", "gpt-4o-mini")
    )
    assert decision.outcome is Outcome.deny
    assert decision.reason == "provider 'openai' is not allowed for tenant 'acme'"
    assert decision.rule == "tenants.acme.allowed_providers"


def test_no_allow_list_means_nothing_is_allowed(
    base_config: dict[str, object], ctx: Callable[..., ActionContext]
) -> None:
    base_config["tenants"] = {"acme": {}}
    decision = Policy.from_dict(base_config).authorize(ctx(), ToolCall(tool="echo"))
    assert decision.outcome is Outcome.deny
    assert "nothing is allowed" in decision.reason


def test_star_allows_every_declared_tool(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy(acme={"allowed_tools": ["*"]}).authorize(
        ctx(), ToolCall(tool="delete_file")
    )
    assert decision.outcome is Outcome.allow


def test_allow_list_inherited_from_defaults_names_the_defaults_rule(
    make_policy: Callable[..., Policy],
    base_config: dict[str, object],
    ctx: Callable[..., ActionContext],
) -> None:
    base_config["tenants"] = {"acme": {}}
    base_config["defaults"] = {"allowed_tools": ["echo"]}
    policy = Policy.from_dict(base_config)
    assert policy.authorize(ctx(), ToolCall(tool="echo")).allowed
    denied = policy.authorize(ctx(), ToolCall(tool="shell"))
    assert (denied.outcome, denied.rule) == (Outcome.deny, "defaults.allowed_tools")


def test_deny_rule_agent_glob(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        acme={"deny": [{"agent": "intern-*", "action": "fs.*", "reason": "interns: no files"}]}
    )
    denied = policy.authorize(ctx("intern-7"), ToolCall(tool="read_file"))
    assert denied.outcome is Outcome.deny
    assert "interns: no files" in denied.reason
    assert "read_file" in denied.reason
    assert denied.rule == "tenants.acme.deny[0]"
    assert policy.authorize(ctx("senior-1"), ToolCall(tool="read_file")).allowed


def test_deny_rule_action_class_glob_matches_by_class(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"deny": [{"action": "fs.w*"}]})
    denied = policy.authorize(ctx(), ToolCall(tool="write_file"))
    assert denied.outcome is Outcome.deny
    assert "denied by rule tenants.acme.deny[0]" in denied.reason
    assert policy.authorize(ctx(), ToolCall(tool="read_file")).allowed


def test_deny_rule_matches_the_action_name(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"deny": [{"action": "http_*", "reason": "offline"}]})
    assert policy.authorize(ctx(), ToolCall(tool="http_get")).outcome is Outcome.deny
    assert policy.authorize(ctx(), ToolCall(tool="echo")).allowed


def test_deny_rule_globs_are_case_sensitive(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"deny": [{"agent": "Intern-*"}]})
    assert policy.authorize(ctx("intern-1"), ToolCall(tool="echo")).allowed


def test_first_matching_deny_rule_wins_defaults_first(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(
        defaults={"deny": [{"agent": "nobody"}, {"action": "process.*", "reason": "global"}]},
        acme={"deny": [{"action": "shell", "reason": "tenant"}, {"reason": "catch-all"}]},
    )
    shell = policy.authorize(ctx(), ToolCall(tool="shell"))
    assert (shell.rule, shell.reason.endswith("global")) == ("defaults.deny[1]", True)
    echo = policy.authorize(ctx(), ToolCall(tool="echo"))
    assert (echo.rule, echo.reason.endswith("catch-all")) == ("tenants.acme.deny[1]", True)


def test_deny_rules_apply_even_to_unknown_tools(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"deny": [{"agent": "quarantined"}]})
    decision = policy.authorize(ctx("quarantined"), ToolCall(tool="no_such_tool"))
    assert decision.rule == "tenants.acme.deny[0]"


def test_allowed_decision_names_tool_tenant_and_rule(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    decision = make_policy().authorize(ctx("bot"), ToolCall(tool="echo"))
    assert decision.allowed
    assert not decision.granted
    assert "'echo'" in decision.reason
    assert "'acme'" in decision.reason
    assert decision.to_dict()["outcome"] == "allow"


def test_an_action_to_hold_without_a_requester_is_denied(
    make_policy: Callable[..., Policy], ctx: Callable[..., ActionContext]
) -> None:
    policy = make_policy(acme={"tiers": {"actions": {"shell": "act_with_approval"}}})
    shell = ToolCall(tool="shell", input={"command": ["ls"]})
    assert policy.authorize(ctx(), shell).outcome is Outcome.hold
    anonymous = policy.authorize(ctx(user=None), shell)
    assert anonymous.outcome is Outcome.deny
    assert "needs a requester: the context has no user" in anonymous.reason
    # Nothing else needs one.
    assert policy.authorize(ctx(user=None), ToolCall(tool="echo")).outcome is Outcome.allow
