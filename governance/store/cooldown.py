"""The shared provider cooldown: one 429 with Retry-After pauses every worker's calls to it.

Without it each worker finds out about the provider's limit with its own 429. With it, the first
429 records "provider P cools down until t" and every admission defers until then: the calls of
that tenant (``scope: tenant``, the default), or of every tenant (``scope: deployment``, for an
API key the deployment shares).
"""

from __future__ import annotations

from governance.store.keys import ProviderKeys, TenantKeys
from governance.store.state import StateStore
from governance.store.vocabulary import COOLDOWN


def cooldown_key(tenant: str, provider: str, *, shared: bool) -> str:
    """Where the cooldown of ``provider`` for ``tenant`` lives (the provider's own key when it
    is shared by the deployment)."""
    return ProviderKeys(provider).cooldown if shared else TenantKeys(tenant).cooldown(provider)


def set_cooldown(
    state: StateStore, tenant: str, provider: str, retry_after_ms: int, *, shared: bool = False
) -> int:
    """Record a cooldown of ``retry_after_ms``; returns its deadline (ms since the epoch).

    A shorter cooldown never shortens a longer one already recorded.
    """
    if retry_after_ms < 0:
        raise ValueError(f"retry_after_ms must be >= 0, got {retry_after_ms}")
    keys = [cooldown_key(tenant, provider, shared=shared)]
    args = COOLDOWN.arrange({"wait_ms": retry_after_ms})
    return int(state.call("cooldown", state.scripts.cooldown, keys, args))


def cooldown_remaining_ms(
    state: StateStore, tenant: str, provider: str, *, shared: bool = False
) -> int:
    """How long calls to ``provider`` for ``tenant`` must still wait (0 when not cooling down)."""
    key = cooldown_key(tenant, provider, shared=shared)
    ttl = state.run("cooldown read", lambda: state.client.pttl(key))
    return max(0, int(ttl))
