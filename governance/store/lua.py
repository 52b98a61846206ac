"""Loads the store's Lua scripts (package data) and registers each once per Redis client.

Scripts that admit, settle, sweep or append to the audit chain share one library
(``scripts/lib.lua``: the admission rules, the wait list and hand-off, the audit chain); it is
prepended to each of them here, so every script stays one atomic call and each rule exists once.

``register_script`` keeps the SHA and sends EVALSHA, falling back to loading the script when the
server does not know it yet (after a restart or failover), so callers never see NOSCRIPT.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script

#: Scripts that run with lib.lua prepended, and the standalone ones.
WITH_LIBRARY = (
    "admit",
    "settle",
    "sweep",
    "audit_append",
    "held_put",
    "held_decide",
    "grant_revoke",
)
STANDALONE = ("renew", "cooldown", "provider_gate")
SCRIPT_NAMES = WITH_LIBRARY + STANDALONE


def _read(name: str) -> str:
    return resources.files("governance.store.scripts").joinpath(f"{name}.lua").read_text("utf-8")


@cache
def script_source(name: str) -> str:
    """The text that runs for ``scripts/<name>.lua`` (with the library, when it uses it)."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f"unknown store script {name!r}; known: {', '.join(SCRIPT_NAMES)}")
    if name in WITH_LIBRARY:
        return f"{_read('lib')}\n-- ---- {name}.lua ----\n{_read(name)}"
    return _read(name)


class Scripts:
    """The registered scripts of one client: ``scripts.admit(keys=..., args=...)``."""

    def __init__(self, client: Any) -> None:
        self.admit: Script = client.register_script(script_source("admit"))
        self.settle: Script = client.register_script(script_source("settle"))
        self.sweep: Script = client.register_script(script_source("sweep"))
        self.audit_append: Script = client.register_script(script_source("audit_append"))
        self.renew: Script = client.register_script(script_source("renew"))
        self.cooldown: Script = client.register_script(script_source("cooldown"))
        self.provider_gate: Script = client.register_script(script_source("provider_gate"))
        self.held_put: Script = client.register_script(script_source("held_put"))
        self.held_decide: Script = client.register_script(script_source("held_decide"))
        self.grant_revoke: Script = client.register_script(script_source("grant_revoke"))
