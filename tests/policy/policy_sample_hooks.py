"""Hooks loaded by name ("policy_sample_hooks:<attr>") in the policy tests; calls are logged."""

from __future__ import annotations

from governance.policy import Action, ActionContext, HookDecision

CALLS: list[str] = []

NOT_CALLABLE = 42


def allow_all(ctx: ActionContext, action: Action) -> HookDecision | None:
    CALLS.append("allow_all")
    return None


def deny_shell(ctx: ActionContext, action: Action) -> HookDecision | None:
    CALLS.append("deny_shell")
    if action.name == "shell":
        return HookDecision.deny(f"no shell for {ctx.agent}")
    return HookDecision.allow()


def deny_everything(ctx: ActionContext, action: Action) -> HookDecision | None:
    CALLS.append("deny_everything")
    return HookDecision.deny("everything is denied")


def explode(ctx: ActionContext, action: Action) -> HookDecision | None:
    CALLS.append("explode")
    raise RuntimeError("hook backend down")


class Checks:
    @staticmethod
    def allow(ctx: ActionContext, action: Action) -> HookDecision | None:
        CALLS.append("Checks.allow")
        return None
