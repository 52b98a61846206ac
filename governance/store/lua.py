"""Loads the store's Lua scripts (package data) and registers each once per Redis client.

Each script's text starts with what ``vocabulary`` generates for it (the functions that read its
arguments, the limit kinds and their phases), and the names of argument positions, audit entry
types and violations in its source are replaced by what they stand for
(``vocabulary.resolve_names``): the constants are part of the script as it is loaded, and
nothing of them is sent, or built, per call. Scripts that admit,
settle, sweep or append to the audit chain then share one library (``scripts/lib.lua``: the
admission rules, the wait list and hand-off, the audit chain), prepended to each of them here,
so every script stays one atomic call and each rule exists once.

``register_script`` keeps the SHA and sends EVALSHA, falling back to loading the script when the
server does not know it yet (after a restart or failover), so callers never see NOSCRIPT.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script

from governance.store.vocabulary import resolve_names, script_prelude

#: Scripts that run with lib.lua prepended, and the standalone ones.
WITH_LIBRARY = (
    "admit",
    "settle",
    "sweep",
    "audit_append",
    "held_put",
    "held_decide",
    "grant_revoke",
    "dispatch",
    "removed_tenant",
)
STANDALONE = ("renew", "cooldown", "provider_gate", "pool_dispatch", "pool_worker")
SCRIPT_NAMES = WITH_LIBRARY + STANDALONE


def _read(name: str) -> str:
    return resources.files("governance.store.scripts").joinpath(f"{name}.lua").read_text("utf-8")


@cache
def script_source(name: str) -> str:
    """The text that runs for ``scripts/<name>.lua`` (with the library, when it uses it)."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f"unknown store script {name!r}; known: {', '.join(SCRIPT_NAMES)}")
    own = f"-- ---- {name}.lua ----\n{_read(name)}"
    if name in WITH_LIBRARY:
        source = f"{script_prelude(name)}-- ---- lib.lua ----\n{_read('lib')}\n{own}"
    else:
        source = f"{script_prelude(name)}{own}"
    return resolve_names(name, source)


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
        self.dispatch: Script = client.register_script(script_source("dispatch"))
        self.pool_dispatch: Script = client.register_script(script_source("pool_dispatch"))
        self.pool_worker: Script = client.register_script(script_source("pool_worker"))
        self.removed_tenant: Script = client.register_script(script_source("removed_tenant"))
