"""The audit log: one Redis Stream per deployment, tamper-evident through an HMAC hash chain.

Each entry carries ``prev`` (the hash of the entry before it) and ``hash`` = HMAC-SHA256(key,
prev + canonical JSON of the entry). The key stays with the writers and the verifier, never in
Redis. Appends are compare-and-set on the chain head (one Lua call); a writer that lost a race
recomputes its hashes from the new head and tries again, so the chain is one total order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governance.store.keys import DeploymentKeys
from governance.store.state import StateStore

#: Fields covered by the hash, in the order they are written.
ENTRY_FIELDS = (
    "ts",
    "type",
    "tenant",
    "agent",
    "run",
    "task_id",
    "action",
    "decision",
    "reason",
    "tier",
    "policy_version",
    "reviewer",
    "detail",
)


class AuditEventType(StrEnum):
    """Every kind of decision or step that leaves an audit entry."""

    AUTHORIZATION_DENIED = "authorization_denied"
    HELD = "held"
    APPROVED = "approved"  # one reviewer's approval, before the quorum is reached
    RELEASED = "released"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SUGGESTED = "suggested"
    SHADOWED = "shadowed"
    ADMITTED = "admitted"
    DEFERRED = "deferred"
    BUDGET_WARNING = "budget_warning"
    TASK_STARTED = "task_started"
    TASK_FINISHED = "task_finished"
    TASK_FAILED = "task_failed"
    RETRY_SCHEDULED = "retry_scheduled"


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
    ts_ms: int | None = None

    def fields(self) -> dict[str, str]:
        """The entry's fields as stored (without ``prev`` and ``hash``); empty ones are left
        out, and the hash covers exactly the fields that are stored."""
        values = {
            "ts": str(self.ts_ms if self.ts_ms is not None else int(time.time() * 1000)),
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


def entry_hash(key: bytes, prev: str, fields: Mapping[str, str]) -> str:
    """HMAC-SHA256 over the previous hash and the canonical JSON of the entry's fields."""
    canonical = json.dumps(
        {k: v for k, v in fields.items() if k not in ("prev", "hash")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hmac.new(key, f"{prev}\n{canonical}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    """An entry read back from the stream."""

    id: str
    fields: dict[str, str]

    @property
    def prev(self) -> str:
        return self.fields.get("prev", "")

    @property
    def hash(self) -> str:
        return self.fields.get("hash", "")


@dataclass(frozen=True)
class VerifyReport:
    """The verifier's verdict: how many entries it checked and the first broken link, if any."""

    checked: int
    broken_entry: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_entry is None


class AuditConflictError(RuntimeError):
    """The chain head kept moving under this writer; raised only after many retries."""


class AuditLog:
    """Appends to, reads and verifies the deployment's audit stream."""

    MAX_ATTEMPTS = 200

    def __init__(self, state: StateStore, key: bytes, *, maxlen: int = 1_000_000) -> None:
        if not key:
            raise ValueError("the audit HMAC key must not be empty")
        self._state = state
        self._key = key
        self._maxlen = maxlen
        self._head: str | None = None  # the last head this writer saw, to skip a GET

    def append(self, *events: AuditEvent) -> list[str]:
        """Append ``events`` in order, atomically; returns their stream ids."""
        if not events:
            return []
        rows = [e.fields() for e in events]
        keys = [DeploymentKeys.audit_stream, DeploymentKeys.audit_head]
        head = self._head if self._head is not None else self._read_head()
        for _ in range(self.MAX_ATTEMPTS):
            entries: list[list[Any]] = []
            prev = head
            for row in rows:
                digest = entry_hash(self._key, prev, row)
                chained = {**row, "prev": prev, "hash": digest}
                entries.append([digest, [x for pair in chained.items() for x in pair]])
                prev = digest
            argv: list[str | int] = [head, self._maxlen, json.dumps(entries)]
            reply = self._state.call("audit append", self._state.scripts.audit_append, keys, argv)
            if int(reply[0]) == 1:
                self._head = prev
                return [_text(i) for i in reply[1:]]
            head = _text(reply[1])
        raise AuditConflictError(f"audit chain head kept moving after {self.MAX_ATTEMPTS} tries")

    def _read_head(self) -> str:
        raw = self._state.run("audit head read", lambda: self._state.client.get(self.head_key))
        return _text(raw) if raw is not None else ""

    @property
    def head_key(self) -> str:
        return DeploymentKeys.audit_head

    def entries(self, page_size: int = 1000) -> Iterator[AuditEntry]:
        """Every entry, oldest first, read in pages."""
        start = "-"
        while True:

            def read_page(first: str = start) -> list[tuple[bytes, dict[bytes, bytes]]]:
                return list(
                    self._state.client.xrange(
                        DeploymentKeys.audit_stream, min=first, max="+", count=page_size
                    )
                )

            page = self._state.run("audit read", read_page)
            for raw_id, raw_fields in page:
                yield _entry(raw_id, raw_fields)
            if len(page) < page_size:
                return
            start = "(" + _text(page[-1][0])

    def tail(self, count: int = 20) -> list[AuditEntry]:
        """The newest ``count`` entries, oldest first."""
        page = self._state.run(
            "audit read",
            lambda: self._state.client.xrevrange(DeploymentKeys.audit_stream, count=count),
        )
        return [_entry(i, f) for i, f in reversed(page)]

    def verify(self) -> VerifyReport:
        """Walk the chain; report the first entry whose hash or link does not hold.

        The oldest retained entry anchors the chain (older ones may have been trimmed by the
        stream's max length); the newest must match the recorded head, so removing entries at
        the end is detected too.
        """
        checked = 0
        previous: AuditEntry | None = None
        for entry in self.entries():
            if previous is not None and entry.prev != previous.hash:
                return VerifyReport(
                    checked,
                    entry.id,
                    f"entry {entry.id}: its prev does not match the hash of entry {previous.id} "
                    "before it (an entry was removed, inserted or reordered)",
                )
            if not hmac.compare_digest(entry_hash(self._key, entry.prev, entry.fields), entry.hash):
                return VerifyReport(
                    checked,
                    entry.id,
                    f"entry {entry.id}: its hash does not match its content "
                    "(the entry was altered)",
                )
            checked += 1
            previous = entry
        head = self._read_head()
        last_hash = previous.hash if previous else ""
        if head != last_hash:
            where = previous.id if previous else "(empty stream)"
            return VerifyReport(
                checked,
                where,
                f"the chain head does not match the newest entry {where} "
                "(entries were removed from the end, or the head was altered)",
            )
        return VerifyReport(checked)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(raw_id: bytes | str, raw_fields: Mapping[Any, Any]) -> AuditEntry:
    return AuditEntry(id=_text(raw_id), fields={_text(k): _text(v) for k, v in raw_fields.items()})
