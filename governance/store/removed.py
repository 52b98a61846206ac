"""Tenants removed from the policy while they have open tasks: found, given a grace, ended.

A reload that drops a tenant must not strand its work (waiting, parked, queued or held tasks that
nobody sweeps any more), nor loop (a record the reconciler publishes again and again because
every delivery is denied on another chain), nor fail a backlog at once because of a typo. So:

- every worker records the tenants its policy names, with their ``max_wait``
  (``DeploymentKeys.known_tenants``): only they can have state, since an unknown tenant's name
  never becomes a key. A known tenant that the policy no longer names is a removed one;
- the maintenance leader notices it (``notice``: when its tasks end, the tenant's ``max_wait``
  from now by default, audited on its own chain); until then its delivered tasks are parked out
  of the broker (``at_delivery``); after it, each open task is marked to end with "tenant removed
  from the policy" and published, so its own delivery ends it with that result (``end``);
  ``govctl tenants end`` does the same at once;
- if the tenant comes back first, its tasks go on (``restore``); once nothing of it is open, it
  is no longer marked, but stays known: its audit chain is still checkpointed and verified.

The work happens in ``scripts/removed_tenant.lua``, in the tenant's slot; the registry and the
set of marked tenants share one slot of their own (``{tenants}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from governance.store.admission import Publication, publications
from governance.store.audit_seal import AuditSealer, begin_sealed_call
from governance.store.keys import REMOVED_FIELDS, DeploymentKeys, TenantKeys
from governance.store.state import StateStore
from governance.store.vocabulary import REMOVED_TENANT

#: Why the open tasks of a removed tenant end (their result and audit entries say it).
REMOVED_REASON = "tenant removed from the policy"


@dataclass(frozen=True)
class RemovedTenant:
    """What a tenant that is no longer in the policy still has open, and when it ends."""

    tenant: str
    open: int
    held: int
    #: When its open tasks end (ms); None until the maintenance noticed it.
    ends_at_ms: int | None
    #: Its max_wait (ms) as the last policy that named it said.
    max_wait_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "open": self.open,
            "held": self.held,
            "ends_at_ms": self.ends_at_ms,
        }


@dataclass(frozen=True)
class DeliveryVerdict:
    """What a worker does with a delivered task of a tenant that is not in its policy."""

    #: unknown (no record: an unknown tenant's message), done (a copy of an ended task), copy
    #: (it runs or is held elsewhere), ended (it ends now, with ``reason``), parked (it waits
    #: out of the broker until ``until_ms``).
    state: str
    reason: str = ""
    until_ms: int | None = None


@dataclass(frozen=True)
class EndRound:
    """One bounded walk of a removed tenant's ledger."""

    publish: tuple[Publication, ...]
    #: Where the walk goes on; "0": it is over.
    cursor: str
    open: int


class RemovedTenants:
    """The registry of tenants policies named, and the handling of those removed since."""

    def __init__(self, state: StateStore, sealer: AuditSealer | None) -> None:
        self._state = state
        self._sealer = sealer

    # -- the registry --------------------------------------------------------------------------

    def register(self, max_wait_ms: Mapping[str, int]) -> None:
        """Record the tenants a policy names, each with its max_wait (a worker loaded it)."""
        if max_wait_ms:
            self._state.run(
                "tenant registry",
                lambda: self._state.client.hset(
                    DeploymentKeys.known_tenants, mapping=dict(max_wait_ms)
                ),
            )

    def known(self) -> dict[str, int]:
        """Every tenant a worker's policy named (and not forgotten), with its max_wait (ms)."""
        raw = self._state.run(
            "tenant registry",
            lambda: self._state.client.hgetall(DeploymentKeys.known_tenants),
        )
        return {_text(name): int(value) for name, value in raw.items()}

    def max_wait_ms(self, tenant: str) -> int | None:
        """``tenant``'s max_wait (ms) as the last policy that named it said; None: never named."""
        raw = self._state.run(
            "tenant registry",
            lambda: self._state.client.hget(DeploymentKeys.known_tenants, tenant),
        )
        return int(raw) if raw is not None else None

    def marked(self) -> set[str]:
        """The tenants noticed as removed (their tasks end after a grace)."""
        raw = self._state.run(
            "tenant registry",
            lambda: self._state.client.smembers(DeploymentKeys.removed_tenants),
        )
        return {_text(name) for name in raw}

    def removed(self, policy_tenants: Iterable[str]) -> list[RemovedTenant]:
        """The known or marked tenants that ``policy_tenants`` does not name, with what they
        still have open (one pipelined read)."""
        known = self.known()
        names = sorted((set(known) | self.marked()) - set(policy_tenants))
        if not names:
            return []

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for name in names:
                keys = TenantKeys(name)
                pipe.zcard(keys.ledger)
                pipe.zcard(keys.held_expiry)
                pipe.hget(keys.meta, "removed_deadline")
            return list(pipe.execute())

        replies = self._state.run("tenant registry", read)
        return [
            RemovedTenant(
                tenant=name,
                open=int(replies[3 * i]),
                held=int(replies[3 * i + 1]),
                ends_at_ms=int(replies[3 * i + 2]) if replies[3 * i + 2] else None,
                max_wait_ms=known.get(name),
            )
            for i, name in enumerate(names)
        ]

    def unmark(self, tenant: str) -> None:
        """A removed tenant with nothing open left: it is no longer marked (it stays known, so
        its audit chain is still checkpointed and verified)."""

        def write() -> None:
            pipe = self._state.client.pipeline(transaction=False)
            pipe.srem(DeploymentKeys.removed_tenants, tenant)
            pipe.hdel(TenantKeys(tenant).meta, *REMOVED_FIELDS)
            pipe.execute()

        self._state.run("tenant registry", write)

    # -- the tenant's tasks --------------------------------------------------------------------

    def notice(self, tenant: str, grace_ms: int, *, by: str = "") -> int:
        """``tenant`` is not in the policy: its open tasks end ``grace_ms`` from now (or
        earlier, if that was set already); audited once on its chain. Returns when (ms)."""
        self._mark(tenant)
        reply = self._call("notice", tenant, grace=max(0, grace_ms), by=by)
        return int(reply["until_ms"])

    def at_delivery(self, tenant: str, task_id: str, grace_ms: int) -> DeliveryVerdict:
        """A worker received ``task_id`` of ``tenant``, which its policy does not name."""
        record = TenantKeys(tenant).task(task_id)
        reply = self._call("deliver", tenant, task_id=task_id, grace=grace_ms, record=record)
        if reply.get("state") == "parked":
            self._mark(tenant)
        return DeliveryVerdict(
            state=str(reply.get("state")),
            reason=str(reply.get("reason") or ""),
            until_ms=int(reply["until_ms"]) if reply.get("until_ms") else None,
        )

    def end(self, tenant: str, cursor: str = "0") -> EndRound:
        """One bounded walk of ``tenant``'s ledger past its deadline (see the script)."""
        reply = self._call("end", tenant, cursor=cursor)
        return EndRound(
            publish=publications(reply.get("pub") or []),
            cursor=str(reply.get("cursor") or "0"),
            open=int(reply.get("open") or 0),
        )

    def restore(self, tenant: str) -> None:
        """``tenant`` is in the policy again: its parked tasks are due now, its marks go."""
        cursor = "0"
        while True:
            cursor = str(self._call("restore", tenant, cursor=cursor).get("cursor") or "0")
            if cursor == "0":
                break
        self._state.run(
            "tenant registry",
            lambda: self._state.client.srem(DeploymentKeys.removed_tenants, tenant),
        )

    def _mark(self, tenant: str) -> None:
        self._state.run(
            "tenant registry",
            lambda: self._state.client.sadd(DeploymentKeys.removed_tenants, tenant),
        )

    def _call(
        self,
        mode: str,
        tenant: str,
        *,
        task_id: str = "",
        grace: int = 0,
        by: str = "",
        cursor: str = "0",
        record: str | None = None,
    ) -> dict[str, Any]:
        args = REMOVED_TENANT.arrange(
            {
                "mode": mode,
                "tenant": tenant,
                "id": task_id,
                "removal_grace": grace,
                "reason": REMOVED_REASON,
                "by": by,
                "cursor": cursor,
                "ttl": self._state.ttl.task_s,
            }
        )
        settings = self._state.script_settings()
        keys = TenantKeys(tenant).shared() + ([record] if record else [])
        return begin_sealed_call(
            self._state,
            self._sealer,
            "removed tenant",
            self._state.scripts.removed_tenant,
            tenant,
            keys,
            lambda seals, writer: [*args, settings, seals, writer],
        ).result()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
