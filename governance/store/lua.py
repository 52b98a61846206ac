"""Loads the store's Lua scripts (package data) and registers each once per Redis client.

``register_script`` keeps the SHA and sends EVALSHA, falling back to loading the script when the
server does not know it yet (after a restart or failover), so callers never see NOSCRIPT.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script

SCRIPT_NAMES = (
    "admit",
    "settle",
    "renew",
    "cooldown",
    "audit_append",
    "park_claim",
    "held_put",
    "held_decide",
    "release_consume",
)


@cache
def script_source(name: str) -> str:
    """The text of ``scripts/<name>.lua``."""
    if name not in SCRIPT_NAMES:
        raise ValueError(f"unknown store script {name!r}; known: {', '.join(SCRIPT_NAMES)}")
    return resources.files("governance.store.scripts").joinpath(f"{name}.lua").read_text("utf-8")


class Scripts:
    """The registered scripts of one client: ``scripts.admit(keys=..., args=...)``."""

    def __init__(self, client: Any) -> None:
        self.admit: Script = client.register_script(script_source("admit"))
        self.settle: Script = client.register_script(script_source("settle"))
        self.renew: Script = client.register_script(script_source("renew"))
        self.cooldown: Script = client.register_script(script_source("cooldown"))
        self.audit_append: Script = client.register_script(script_source("audit_append"))
        self.park_claim: Script = client.register_script(script_source("park_claim"))
        self.held_put: Script = client.register_script(script_source("held_put"))
        self.held_decide: Script = client.register_script(script_source("held_decide"))
        self.release_consume: Script = client.register_script(script_source("release_consume"))
