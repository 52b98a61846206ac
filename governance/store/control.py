"""What operators set on a tenant at run time (fair dispatch): a pause, and a concurrency or a
weight for a while. The scripts read it on every call (never cached by a process), so it takes
effect at once: a paused tenant's tasks wait (and are not failed by ``max_wait`` meanwhile), an
override is in force until its time passes and then reverts by itself. Each change is audited on
the tenant's chain, with who made it.

The fields live in the tenant's meta hash (``keys.CONTROL_FIELDS``); a weight is also written
to the worker pools, whose fair-share script reads it there (a slot of their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from governance.store.audit import AuditEvent, AuditLog
from governance.store.keys import PoolKeys, TenantKeys
from governance.store.state import StateStore


@dataclass(frozen=True)
class TenantControl:
    """What operators set on one tenant, as it stands (overrides past their time are gone)."""

    tenant: str
    paused: bool = False
    concurrency: int | None = None
    concurrency_until_ms: int | None = None
    weight: float | None = None
    weight_until_ms: int | None = None


class Controls:
    """Reads and sets the operators' controls of tenants."""

    def __init__(self, state: StateStore, audit: AuditLog) -> None:
        self._state = state
        self._audit = audit

    def read(self, tenant: str) -> TenantControl:
        raw = self._state.run(
            "tenant control",
            lambda: self._state.client.hmget(
                TenantKeys(tenant).meta,
                "ctl_paused",
                "ctl_concurrency",
                "ctl_concurrency_until",
                "ctl_weight",
                "ctl_weight_until",
            ),
        )
        paused, conc, conc_until, weight, weight_until = (_text(v) for v in raw)
        now = int(time.time() * 1000)
        conc_live = conc is not None and int(conc_until or 0) > now
        weight_live = weight is not None and int(weight_until or 0) > now
        return TenantControl(
            tenant=tenant,
            paused=paused == "1",
            concurrency=int(conc) if conc_live and conc is not None else None,
            concurrency_until_ms=int(conc_until or 0) if conc_live else None,
            weight=float(weight) if weight_live and weight is not None else None,
            weight_until_ms=int(weight_until or 0) if weight_live else None,
        )

    def pause(self, tenant: str, event: AuditEvent) -> None:
        """Pause ``tenant``: its running tasks finish, nothing of it starts, its tasks wait."""
        self._state.run(
            "tenant pause",
            lambda: self._state.client.hset(TenantKeys(tenant).meta, "ctl_paused", 1),
        )
        self._audit.append(event)

    def resume(self, tenant: str, event: AuditEvent) -> None:
        """Resume ``tenant``: its waiting tasks' wait limit counts again from now."""
        now = int(time.time() * 1000)
        meta = TenantKeys(tenant).meta

        def resume() -> None:
            pipe = self._state.client.pipeline(transaction=True)
            pipe.hdel(meta, "ctl_paused")
            pipe.hset(meta, "ctl_resumed_at", now)
            pipe.execute()

        self._state.run("tenant resume", resume)
        self._audit.append(event)

    def override(
        self,
        tenant: str,
        *,
        until_ms: int,
        concurrency: int | None,
        weight: float | None,
        queues: Iterable[str],
        event: AuditEvent,
    ) -> None:
        """Set ``tenant``'s concurrency and/or weight until ``until_ms`` (in its meta, and the
        weight in each pool of ``queues``)."""
        fields: dict[str, str | int] = {}
        if concurrency is not None:
            fields |= {"ctl_concurrency": concurrency, "ctl_concurrency_until": until_ms}
        if weight is not None:
            fields |= {"ctl_weight": repr(weight), "ctl_weight_until": until_ms}
        meta = TenantKeys(tenant).meta
        self._state.run("limits override", lambda: self._state.client.hset(meta, mapping=fields))
        if weight is not None:
            pool: dict[str, str | int] = {
                f"{tenant}:wo": repr(weight),
                f"{tenant}:wo_until": until_ms,
            }
            self._pools(queues, lambda pipe, key: pipe.hset(key, mapping=pool))
        self._audit.append(event)

    def _pools(self, queues: Iterable[str], write: Callable[[Any, str], object]) -> None:
        """``write`` the tenants hash of each pool of ``queues`` (one pipeline per pool: each
        is in a slot of its own)."""
        for queue in queues:
            key = PoolKeys(queue).tenants

            def one(k: str = key) -> None:
                pipe = self._state.client.pipeline(transaction=False)
                write(pipe, k)
                pipe.execute()

            self._state.run("limits override", one)

    def clear(self, tenant: str, queues: Iterable[str], event: AuditEvent) -> None:
        """End ``tenant``'s overrides now."""
        meta = TenantKeys(tenant).meta
        self._state.run(
            "limits override",
            lambda: self._state.client.hdel(
                meta, "ctl_concurrency", "ctl_concurrency_until", "ctl_weight", "ctl_weight_until"
            ),
        )
        self._pools(queues, lambda pipe, key: pipe.hdel(key, f"{tenant}:wo", f"{tenant}:wo_until"))
        self._audit.append(event)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
