"""The audit log: one chain per tenant (a Redis Stream in the tenant's slot), sealed with HMACs.

Every decision leaves an entry: the admission and settlement scripts write theirs in the same
atomic call that decides (see ``scripts/lib.lua``), so a governed task costs no extra round trip
for its audit, and no key is written by every tenant (the chains spread over a Redis Cluster).
Entries that are not part of a script's decision (a denial at publish time, a note of govctl) are
appended here with :meth:`AuditLog.append`. How entries are sealed is in :mod:`audit_seal`; how a
chain is verified, checkpointed and trimmed in :mod:`audit_verify`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from governance.store.audit_seal import AuditSealer, begin_sealed_call, parse_written

# The entry types and fields are declared in audit_types (a leaf the vocabulary shares); they are
# this module's names too.
from governance.store.audit_types import ENTRY_FIELDS as ENTRY_FIELDS
from governance.store.audit_types import SEAL_TYPE as SEAL_TYPE
from governance.store.audit_types import TEMPLATE_FIELDS as TEMPLATE_FIELDS
from governance.store.audit_types import AuditEventType as AuditEventType
from governance.store.keys import DEPLOYMENT_CHAIN, TenantKeys
from governance.store.vocabulary import AUDIT_APPEND

if TYPE_CHECKING:
    from governance.store.state import StateStore


@dataclass(frozen=True)
class AuditEvent:
    """One decision to record. Empty strings stand for "not applicable"."""

    type: AuditEventType
    tenant: str = ""
    agent: str = ""
    run: str = ""
    task_id: str = ""
    action: str = ""
    decision: str = ""
    reason: str = ""
    tier: str = ""
    policy_version: str = ""
    reviewer: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        """The entry's fields as the script writes them; empty ones are left out."""
        values = {
            "type": self.type.value,
            "tenant": self.tenant,
            "agent": self.agent,
            "run": self.run,
            "task_id": self.task_id,
            "action": self.action,
            "decision": self.decision,
            "reason": self.reason,
            "tier": self.tier,
            "policy_version": self.policy_version,
            "reviewer": self.reviewer,
            "detail": (
                json.dumps(dict(self.detail), sort_keys=True, separators=(",", ":"))
                if self.detail
                else ""
            ),
        }
        return {name: values[name] for name in ENTRY_FIELDS if values[name]}

    @property
    def chain(self) -> str:
        """The chain the event belongs to: its tenant's, or the deployment's."""
        return self.tenant or DEPLOYMENT_CHAIN


@dataclass(frozen=True)
class AuditEntry:
    """An entry read back from a chain."""

    chain: str
    id: str
    fields: dict[str, str]

    @property
    def seq(self) -> int:
        """The entry's sequence number (0 when it has none: see :attr:`valid_seq`)."""
        return self.valid_seq or 0

    @property
    def valid_seq(self) -> int | None:
        """The entry's sequence number, or None when it has no valid one (a positive decimal
        integer, as the scripts write it): an entry without one was not written by them."""
        raw = self.fields.get("seq", "")
        if not raw.isascii() or not raw.isdigit() or raw.startswith("0"):
            return None
        return int(raw)

    @property
    def ts_ms(self) -> int:
        raw = self.fields.get("ts", "")
        return int(raw) if raw.isascii() and raw.isdigit() else 0

    @property
    def written_ms(self) -> int:
        """When Redis wrote the entry: its stream id's time, which no field edit can move
        (``ts`` is a field, and anyone who can write Redis can set it). An id chosen by hand
        (``XADD`` with an explicit id) may lie ahead of time: ``verify`` names one."""
        return int(self.id.split("-", 1)[0])

    @property
    def is_seal(self) -> bool:
        return self.fields.get("type") == SEAL_TYPE


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chain_for(tenant: str | None, known: Iterable[str]) -> str:
    """The chain of an event about ``tenant``: its own if configured, else the deployment's (an
    unknown tenant's name, chosen by whoever sent the message, never becomes a key)."""
    return tenant if tenant and tenant in set(known) else DEPLOYMENT_CHAIN


class AuditLog:
    """Appends to, reads and seals the tenants' audit chains."""

    def __init__(self, state: StateStore, sealer: AuditSealer) -> None:
        self._state = state
        self.sealer = sealer

    @classmethod
    def with_key(cls, state: StateStore, key: bytes) -> AuditLog:
        """The chains of ``state``, sealed (and verified) with ``key``."""
        return cls(state, AuditSealer(key))

    @property
    def state(self) -> StateStore:
        return self._state

    def append(self, *events: AuditEvent) -> list[str]:
        """Append ``events`` (each to its chain) and seal them at once; returns their ids."""
        ids: list[str] = []
        by_chain: dict[str, list[AuditEvent]] = {}
        for event in events:
            by_chain.setdefault(event.chain, []).append(event)
        for chain, chained in by_chain.items():
            written = self._call(chain, json.dumps([e.fields() for e in chained]))
            ids += [entry_id for entry_id, _ in written]
            self.flush(chain)
        return ids

    def end_task(self, event: AuditEvent, ttl_s: int) -> str:
        """Append ``event`` and, in the same call, end the ledger record of its task, which ends
        on the worker without running (denied, shadowed): it lets go of its slot, reservation
        and place in the wait list, and the reconciler no longer publishes it. An event on the
        deployment's chain (an unknown tenant) has no record in its slot and is only appended.
        Returns the entry's id."""
        entries_json = json.dumps([event.fields()])
        record = TenantKeys(event.chain).task(event.task_id) if event.tenant else None
        written = self._call(event.chain, entries_json, ending=(record, ttl_s) if record else None)
        self.flush(event.chain)
        return written[0][0]

    def flush(self, chain: str) -> None:
        """Write the seals this process still owes ``chain`` (one call, no entries)."""
        if self.sealer.owes(chain):
            self._call(chain, "[]")

    def flush_due(self, older_than_s: float) -> None:
        """Write the seals owed for longer than ``older_than_s`` (the background flush)."""
        for chain in self.sealer.due(older_than_s):
            self.flush(chain)

    def _call(
        self, chain: str, entries_json: str, ending: tuple[str, int] | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """One audit_append call: ``ending`` is (the ledger record to end, seconds to keep it)."""
        keys = TenantKeys(chain).shared() + ([ending[0]] if ending else [])
        args = AUDIT_APPEND.arrange(
            {"entries": entries_json, "record_ttl": ending[1] if ending else ""}
        )
        reply = begin_sealed_call(
            self._state,
            self.sealer,
            "audit append",
            self._state.scripts.audit_append,
            chain,
            keys,
            lambda seals, writer: [*args, seals, writer],
        ).result()
        return parse_written(reply["au"] or [])

    # -- reading ------------------------------------------------------------------------------

    def entries(self, chain: str, page_size: int = 1000, start: str = "-") -> Iterator[AuditEntry]:
        """Every entry of ``chain`` (seals included), oldest first, read in pages."""
        key = TenantKeys(chain).audit
        first = start
        while True:

            def read_page(lower: str = first) -> list[tuple[bytes, dict[bytes, bytes]]]:
                return list(self._state.client.xrange(key, min=lower, max="+", count=page_size))

            page = self._state.run("audit read", read_page)
            for raw_id, raw_fields in page:
                yield _entry(chain, raw_id, raw_fields)
            if len(page) < page_size:
                return
            first = "(" + _text(page[-1][0])

    def records(self, chain: str) -> Iterator[AuditEntry]:
        """The decision entries of ``chain`` (no seals), oldest first."""
        return (e for e in self.entries(chain) if not e.is_seal)

    def tail(self, chains: Iterable[str], count: int = 20) -> list[AuditEntry]:
        """The newest ``count`` decision entries across ``chains``, oldest first."""
        newest: list[AuditEntry] = []
        for chain in chains:
            key = TenantKeys(chain).audit

            def read(k: str = key) -> list[tuple[bytes, dict[bytes, bytes]]]:
                return list(self._state.client.xrevrange(k, count=count * 2))

            page = self._state.run("audit read", read)
            entries = [_entry(chain, i, f) for i, f in page]
            newest += [e for e in entries if not e.is_seal][:count]
        newest.sort(key=lambda e: (e.ts_ms, e.chain, e.seq))
        return newest[-count:]

    def first_id(self, chain: str) -> str | None:
        """The stream id of the chain's oldest entry (seals included), None if it is empty."""
        key = TenantKeys(chain).audit

        def read() -> list[tuple[bytes, dict[bytes, bytes]]]:
            return list(self._state.client.xrange(key, count=1))

        page = self._state.run("audit read", read)
        return _text(page[0][0]) if page else None

    def entry(self, chain: str, entry_id: str) -> AuditEntry | None:
        """The entry ``entry_id`` of ``chain``, if it is there."""
        key = TenantKeys(chain).audit

        def read() -> list[tuple[bytes, dict[bytes, bytes]]]:
            return list(self._state.client.xrange(key, min=entry_id, max=entry_id, count=1))

        page = self._state.run("audit read", read)
        return _entry(chain, page[0][0], page[0][1]) if page else None

    def head_seq(self, chain: str) -> int:
        """The sequence number of the newest entry the chain's counter says was written
        (ValueError if the counter is not a number: someone wrote it)."""
        key = TenantKeys(chain).meta
        raw = self._state.run("audit read", lambda: self._state.client.hget(key, "audit_seq"))
        return int(raw) if raw is not None else 0


def _entry(chain: str, raw_id: bytes | str, raw_fields: Mapping[Any, Any]) -> AuditEntry:
    return AuditEntry(
        chain=chain, id=_text(raw_id), fields={_text(k): _text(v) for k, v in raw_fields.items()}
    )


def now_ms() -> int:
    return int(time.time() * 1000)
