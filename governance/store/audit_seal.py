"""Seals: the HMACs that make the audit chains tamper-evident, with a key that never goes to Redis.

Entries are written by the Lua scripts that make the decisions (admission, settlement, hand-off,
held-task decisions), so the entry and the decision are one atomic write; the script numbers
each entry in its tenant's chain (``seq``) and returns exactly what it wrote. The writer keeps
that reply and computes the seal of each entry, ``HMAC(key, chain, stream id, fields)``, over it
(not over a later read, so an edit made in between shows) when the seals go out: with its next
call to the same chain, as one ``seal`` entry for a batch of entries. A background flush writes
the seals of a chain that gets no next call soon. A writer killed before sealing leaves its last
entries unsealed: the maintenance leader adopts them after a grace period (sealing what it reads,
which it records).

Each process also remembers, per chain, the newest entry it wrote (its ``seq`` and stream id). A
later entry given a ``seq`` no higher than that means the chain's counter went back: entries
were cut and the counter reset (or the state Redis lost writes). It logs an error, where whoever
writes Redis cannot reach; the maintenance leader, which watches every chain, also records it in
the chain (see :mod:`audit_verify`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json

from governance import forksafe
from governance.store.pending import Pending

if TYPE_CHECKING:
    from governance.store.state import StateStore

SEAL_VERSION = "v1"

log = logging.getLogger("governance.audit")


def key_id(key: bytes) -> str:
    """A public name of an audit key (16 hex digits of an HMAC under it): it tells whether two
    parties use the same key without revealing it (anchors carry it; see :mod:`audit_anchor`)."""
    return hmac.new(key, b"governance audit key id v1", hashlib.sha256).hexdigest()[:16]


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a pair of numbers, to compare two ids ("1700000000000-3")."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def canonical_fields(fields: Mapping[str, str]) -> str:
    """The fields of an entry as one canonical JSON text (sorted keys, no spaces)."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def seal_mac(key: bytes, chain: str, entry_id: str, fields: Mapping[str, str]) -> str:
    """The seal of one entry: it covers the chain, the entry's stream id and every field."""
    message = f"{SEAL_VERSION}\n{chain}\n{entry_id}\n{canonical_fields(fields)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:40]


def mark_mac(key: bytes, chain: str, kind: str, body: Mapping[str, Any]) -> str:
    """The seal of a checkpoint or a trim record of a chain."""
    text = json.dumps(dict(body), sort_keys=True, separators=(",", ":"))
    message = f"{SEAL_VERSION}\n{chain}\nmark:{kind}\n{text}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:40]


def parse_written(
    written: Sequence[Any], template: Mapping[str, str] | None = None
) -> list[tuple[str, dict[str, str]]]:
    """The ``au`` part of a script's reply: [(stream id, fields), ...]. An entry flagged as a
    task's (``[id, flat, 1]``, lib.lua's ``L.task_entry``) was written with the call's audit
    ``template`` too, which the reply leaves out: its non-empty fields are added back here."""
    entries = []
    for item in written or ():
        entry_id, flat = item[0], item[1]
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        if len(item) > 2:
            if template is None:
                raise ValueError(
                    f"audit entry {entry_id} was written with the call's template, which the "
                    "caller did not give"
                )
            fields.update((name, value) for name, value in template.items() if value)
        entries.append((str(entry_id), fields))
    return entries


@dataclass
class _Pending:
    """What a chain is owed: seals computed already (given back after a failed call) and
    entries written but not sealed yet (sealed together when they are taken)."""

    seals: list[list[Any]]
    since: float
    entries: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seals) + len(self.entries)


class AuditSealer:
    """The seals this process owes, per chain, until a call to that chain carries them."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the audit HMAC key must not be empty")
        self._key = key
        self._lock = forksafe.lock()
        self._pending: dict[str, _Pending] = {}
        #: Per chain, the newest entry this process wrote: (its stream id as numbers, its seq).
        self._newest: dict[str, tuple[tuple[int, int], int]] = {}
        self._pid = forksafe.pid()
        self._writer = self._new_writer_id()

    @staticmethod
    def _new_writer_id() -> str:
        return f"{socket.gethostname()}:{forksafe.pid()}:{uuid.uuid4().hex[:6]}"

    def _check_fork(self) -> None:
        # A forked child must not carry (and later write twice) the parent's pending seals.
        if forksafe.pid() != self._pid:
            self._pid = forksafe.pid()
            self._pending = {}
            self._newest = {}
            self._writer = self._new_writer_id()

    @property
    def writer(self) -> str:
        """Who writes these seals (host, pid and a random suffix)."""
        with self._lock:
            self._check_fork()
            return self._writer

    def take(self, chain: str, *, batch: int = 1, older_than_s: float = 0.0) -> str:
        """The pending seals of ``chain`` as the scripts' JSON argument; they leave the queue
        (give them back with :meth:`give_back` if the call fails). With ``batch``, only once
        that many are owed, or once they have waited ``older_than_s``: the hot path carries
        seals in batches (one stream entry for many), the background flush writes the rest."""
        with self._lock:
            self._check_fork()
            pending = self._pending.get(chain)
            if pending is None:
                return "[]"
            if len(pending) < batch and time.monotonic() - pending.since < older_than_s:
                return "[]"
            del self._pending[chain]
        key = self._key
        seals = pending.seals + [
            [int(fields["seq"]), seal_mac(key, chain, entry_id, fields)]
            for entry_id, fields in pending.entries
        ]
        return json.dumps(seals, separators=(",", ":"))

    def give_back(self, chain: str, seals_json: str) -> None:
        """Seals taken for a call that failed: owed again (a duplicate seal is harmless)."""
        seals = json.loads(seals_json)
        if not seals:
            return
        with self._lock:
            pending = self._pending.setdefault(chain, _Pending([], time.monotonic()))
            pending.seals[:0] = seals

    def wrote(
        self, chain: str, written: Sequence[Any], template: Mapping[str, str] | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Owe seals for the entries a script reports it wrote (exactly as it reports them, with
        the call's audit ``template``: see :func:`parse_written`); returns them, parsed. The
        seals are computed when they are taken, together: one loop over a batch costs about
        half of what sealing each entry after its call does."""
        entries = parse_written(written, template)
        if not entries:
            return entries
        with self._lock:
            self._check_fork()
            pending = self._pending.setdefault(chain, _Pending([], time.monotonic()))
            pending.entries.extend(entries)
            went_back = [self._went_back(chain, entry_id, f) for entry_id, f in entries]
        for problem in went_back:
            if problem:
                log.error("%s", problem)
        return entries

    def _went_back(self, chain: str, entry_id: str, fields: Mapping[str, str]) -> str:
        """Whether the chain's counter went back since this process's newest entry: a problem
        to log, or "". Replies may be read out of order (several threads), so the newest entry
        is the one with the highest stream id, and the sign of both differences must agree."""
        try:
            seq = int(fields["seq"])
        except (KeyError, ValueError):
            return ""
        order = id_order(entry_id)
        newest = self._newest.get(chain)
        if newest is None or order > newest[0]:
            self._newest[chain] = (order, seq)
        if newest is None or order == newest[0]:
            return ""
        newest_order, newest_seq = newest
        if (order > newest_order and seq > newest_seq) or (
            order < newest_order and seq < newest_seq
        ):
            return ""
        earlier, later = sorted([(newest_order, newest_seq), (order, seq)])
        return (
            f"audit chain {chain!r}: this process wrote seq {earlier[1]} (entry "
            f"{earlier[0][0]}-{earlier[0][1]}), then was given seq {later[1]} (entry "
            f"{later[0][0]}-{later[0][1]}): the chain's counter went back (entries cut and the "
            "counter reset, the chain wiped, or the state Redis lost writes)"
        )

    def owes(self, chain: str) -> bool:
        """Whether this process owes ``chain`` any seals."""
        with self._lock:
            self._check_fork()
            return chain in self._pending

    def due(self, older_than_s: float) -> list[str]:
        """Chains whose seals have waited longer than ``older_than_s`` for a call."""
        limit = time.monotonic() - older_than_s
        with self._lock:
            self._check_fork()
            return [chain for chain, p in self._pending.items() if p.since <= limit]


def begin_sealed_call(
    state: StateStore,
    sealer: AuditSealer | None,
    operation: str,
    script: Any,
    chain: str,
    keys: Sequence[Any],
    args: Callable[[str, str], Sequence[Any]],
    *,
    batch: int = 1,
    older_than_s: float = 0.0,
    template: Mapping[str, str] | None = None,
) -> Pending[dict[str, Any]]:
    """Write one call of a script that writes audit entries to ``chain``: ``args(seals,
    writer)`` are its arguments, carrying the seals this process owes the chain (taken as
    :meth:`AuditSealer.take` says). Reading the reply (a JSON object; on this thread) owes the
    seals of the entries it reports (``au``, completed with the audit ``template`` the call
    sent, for the entries of its task). If the call fails, the seals it carried are owed
    again. Without a sealer the entries stay unsealed."""
    seals = sealer.take(chain, batch=batch, older_than_s=older_than_s) if sealer else "[]"
    writer = sealer.writer if sealer else "unsealed"
    try:
        raw_reply = state.begin(operation, script, keys, args(seals, writer))
    except Exception:
        if sealer:
            sealer.give_back(chain, seals)
        raise

    def reply() -> dict[str, Any]:
        try:
            raw = raw_reply.result()
        except Exception:
            if sealer:
                sealer.give_back(chain, seals)
            raise
        parsed: dict[str, Any] = from_json(raw)
        if sealer:
            written = parsed.get("au")
            # Lua's JSON encodes an empty list as an empty object.
            sealer.wrote(chain, [] if isinstance(written, Mapping) else written or [], template)
        return parsed

    return Pending(reply)
