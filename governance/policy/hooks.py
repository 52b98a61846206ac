"""Pre-execution hooks: deployment code that may veto an action; the first deny wins.

A hook is any callable `(ctx, action) -> HookDecision | None` (None allows). Hooks run in order and
stop at the first deny (seed 002). A hook that raises or returns something else denies: a broken
safety check must not let everything through.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from governance.policy.actions import Action
from governance.policy.context import ActionContext

HOOK_SPEC_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
"""The form of a hook spec: "package.module:attribute"."""


class HookLoadError(ValueError):
    """A hook spec that is malformed, cannot be imported, or does not name a callable."""


@dataclass(frozen=True)
class HookDecision:
    """A hook's verdict; `hook` names the hook that denied (set by `run_hooks`)."""

    allowed: bool
    reason: str | None = None
    hook: str | None = None

    @classmethod
    def allow(cls) -> HookDecision:
        return cls(True)

    @classmethod
    def deny(cls, reason: str) -> HookDecision:
        return cls(False, reason or "denied")


Hook = Callable[[ActionContext, Action], HookDecision | None]
"""A pre-execution check; returning None allows."""


def load_hook(spec: str) -> Hook:
    """Import the callable named by "package.module:attr" (attr may be dotted, "mod:Cls.meth")."""
    if not isinstance(spec, str) or HOOK_SPEC_RE.fullmatch(spec) is None:
        raise HookLoadError(f"hook must be given as 'package.module:attribute' (got {spec!r})")
    module_name, _, attr_path = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config problem
        raise HookLoadError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError as exc:
            raise HookLoadError(f"{spec!r}: {attr!r} not found") from exc
    if not callable(target):
        raise HookLoadError(f"{spec!r} is not callable (got {type(target).__name__})")
    hook: Hook = target
    return hook


def hook_name(hook: Hook) -> str:
    """A readable name for a hook: "module:qualname" when it has one."""
    module = getattr(hook, "__module__", None)
    qualname = getattr(hook, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return repr(hook)


def run_hooks(
    hooks: Sequence[Hook],
    ctx: ActionContext,
    action: Action,
    *,
    names: Sequence[str] | None = None,
) -> HookDecision:
    """Run `hooks` in order and return the first deny, or allow if none denies.

    Later hooks do not run after a deny. The returned deny carries `hook` (from `names`, else the
    callable's name) and a reason that starts with "hook <name>", so it says which hook decided.
    """
    if names is not None and len(names) != len(hooks):
        raise ValueError(f"got {len(names)} names for {len(hooks)} hooks")
    for index, hook in enumerate(hooks):
        name = names[index] if names is not None else hook_name(hook)
        try:
            result = hook(ctx, action)
        except Exception as exc:  # fail closed: a crashing check denies
            return HookDecision(False, f"hook {name} raised {type(exc).__name__}: {exc}", name)
        if result is None or (isinstance(result, HookDecision) and result.allowed):
            continue
        if not isinstance(result, HookDecision):
            reason = f"hook {name} returned {type(result).__name__}, not HookDecision or None"
            return HookDecision(False, reason, name)
        return HookDecision(False, f"hook {name}: {result.reason or 'denied'}", name)
    return HookDecision.allow()
