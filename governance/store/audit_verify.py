"""Verifying an audit chain, and the marks that make a cut tail and a trimmed head visible.

A chain is a tenant's stream of numbered entries (``seq`` 1, 2, 3, ... assigned atomically with
each decision) and the seals that authenticate them (see :mod:`audit_seal`). :func:`verify`
walks it and names every break it finds:

- an entry whose seal does not match its content: it was **edited** (or its seal was);
- a missing sequence number: entries were **removed** from the middle;
- a sequence number out of order or twice: entries were **reordered** or **inserted**;
- an entry older than the seal grace with no seal: **inserted** (a writer cannot forge a seal),
  or written by a process killed before it sealed it and before the leader adopted it;
- the chain's counter, or the newest signed **checkpoint**, beyond the last entry: the **tail
  was cut**;
- the first entry after the point the newest signed **trim record** allows: the **head was
  trimmed** beyond the retention.

Entries appended while it runs are not judged (it reads the counter first), and entries younger
than the seal grace are reported as pending, not as breaks: no false alarm under load.

The maintenance leader writes the marks: a checkpoint of every chain that moved (every
``checkpoint_s``), a trim record before it trims entries older than the retention, and seals
for entries whose writer died (``adopt``). Marks are HMAC'd with the audit key like seals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from governance.store.audit import AuditEntry, AuditLog, now_ms
from governance.store.audit_seal import mark_mac, seal_mac
from governance.store.keys import TenantKeys
from governance.store.vocabulary import AUDIT_APPEND

log_trim = logging.getLogger("governance.audit")


@dataclass(frozen=True)
class Break:
    """One place where a chain does not hold."""

    entry: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on one chain: entries checked, still pending, adopted, and every break."""

    chain: str
    checked: int
    pending: int = 0
    adopted: int = 0
    breaks: tuple[Break, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def broken_entry(self) -> str | None:
        return self.breaks[0].entry if self.breaks else None

    @property
    def reason(self) -> str:
        return self.breaks[0].reason if self.breaks else ""


def read_mark(
    log: AuditLog, key: bytes, chain: str, kind: str
) -> tuple[dict[str, Any] | None, str]:
    """A chain's newest mark of ``kind`` ("checkpoint" or "trim") and a problem, if any."""
    marks_key = TenantKeys(chain).audit_marks
    raw = log.state.run("audit marks", lambda: log.state.client.hget(marks_key, kind))
    if raw is None:
        return None, ""
    try:
        mark = json.loads(raw)
        body, mac = mark["body"], mark["mac"]
    except (ValueError, KeyError, TypeError):
        return None, f"the {kind} record of chain {chain!r} is unreadable (altered)"
    if mark_mac(key, chain, kind, body) != mac:
        return None, f"the {kind} record of chain {chain!r} does not match its seal (altered)"
    return dict(body), ""


def write_mark(log: AuditLog, key: bytes, chain: str, kind: str, body: dict[str, Any]) -> None:
    marks_key = TenantKeys(chain).audit_marks
    value = json.dumps({"body": body, "mac": mark_mac(key, chain, kind, body)})
    log.state.run("audit marks", lambda: log.state.client.hset(marks_key, kind, value))


def verify(log: AuditLog, key: bytes, chain: str, *, seal_grace_ms: int = 30_000) -> VerifyReport:
    """Walk ``chain`` and report every break (see the module doc)."""
    breaks: list[Break] = []
    trim, problem = read_mark(log, key, chain, "trim")
    if problem:
        breaks.append(Break("(trim record)", problem))
    checkpoint, problem = read_mark(log, key, chain, "checkpoint")
    if problem:
        breaks.append(Break("(checkpoint)", problem))
    head = log.head_seq(chain)
    first_expected = int(trim["first_seq"]) if trim else 1
    cutoff = now_ms() - seal_grace_ms

    expected = first_expected
    seen_first: int | None = None
    unsealed: dict[int, AuditEntry] = {}
    ids_by_seq: dict[int, str] = {}
    checked = adopted = 0
    last_seq = first_expected - 1
    for entry in log.entries(chain):
        if entry.is_seal:
            adopted_by = entry.fields.get("by", "").startswith("adopted")
            for seq, mac in _seals(entry):
                target = unsealed.pop(seq, None)
                if target is None:
                    continue
                if seal_mac(key, chain, target.id, target.fields) != mac:
                    breaks.append(
                        Break(
                            target.id,
                            f"entry {target.id} (seq {seq}) does not match its seal: "
                            "it was altered",
                        )
                    )
                else:
                    checked += 1
                    adopted += adopted_by
            continue
        seq = entry.seq
        if seq < first_expected or seq > head:
            continue  # before the recorded trim point (not trimmed yet), or appended since
        if seen_first is None:
            seen_first = seq
            if seq > first_expected:
                where = "the trim record" if trim else "the start of the chain"
                breaks.append(
                    Break(
                        entry.id,
                        f"entries seq {first_expected}..{seq - 1} are missing before entry "
                        f"{entry.id}: the head was trimmed beyond {where}",
                    )
                )
                expected = seq
        if seq > expected:
            breaks.append(
                Break(
                    entry.id,
                    f"entries seq {expected}..{seq - 1} are missing before entry {entry.id}: "
                    "removed",
                )
            )
        elif seq < expected:
            breaks.append(
                Break(
                    entry.id,
                    f"entry {entry.id} has seq {seq} where seq {expected} or later belongs: "
                    "entries were reordered or inserted",
                )
            )
        expected = max(expected, seq + 1)
        last_seq = max(last_seq, seq)
        ids_by_seq[seq] = entry.id
        unsealed[seq] = entry
    pending = 0
    for seq, entry in sorted(unsealed.items()):
        if entry.written_ms >= cutoff:
            pending += 1
            continue
        breaks.append(
            Break(
                entry.id,
                f"entry {entry.id} (seq {seq}) has no valid seal: it was inserted, or its writer "
                "was killed before sealing it and it was not adopted",
            )
        )
    if head > last_seq:
        breaks.append(
            Break(
                "(tail)",
                f"the chain's counter says seq {head} was written but it ends at seq {last_seq}: "
                "the tail was cut",
            )
        )
    if checkpoint:
        cp_seq, cp_id = int(checkpoint["seq"]), str(checkpoint["id"])
        if cp_seq >= first_expected and cp_seq <= head and ids_by_seq.get(cp_seq) != cp_id:
            breaks.append(
                Break(
                    "(tail)",
                    f"checkpoint of {checkpoint['ts']} covers seq {cp_seq} (entry {cp_id}) but the "
                    f"chain ends at seq {last_seq}: the tail was cut",
                )
            )
        elif cp_seq > head:
            breaks.append(
                Break(
                    "(tail)",
                    f"checkpoint covers seq {cp_seq} but the chain's counter is {head}: the tail "
                    "was cut and the counter reset",
                )
            )
    return VerifyReport(chain, checked, pending, adopted, tuple(breaks))


def _first_seq(rows: Iterable[tuple[Any, dict[Any, Any]]]) -> int | None:
    """The seq of the first decision entry in ``rows`` (raw stream rows; seal entries skipped)."""
    for _raw_id, raw_fields in rows:
        fields = {_t(k): _t(v) for k, v in raw_fields.items()}
        if "seq" in fields:
            return int(fields["seq"])
    return None


def _seals(entry: AuditEntry) -> list[tuple[int, str]]:
    try:
        return [(int(seq), str(mac)) for seq, mac in json.loads(entry.fields.get("seals", "[]"))]
    except (ValueError, TypeError):
        return []


class ChainRolledBack(Exception):
    """A chain ends before a point its signer signed earlier: its tail was cut and its counter
    reset, or an older checkpoint was put back. Nothing is signed over it."""


def checkpoint(log: AuditLog, key: bytes, chain: str, *, at_least: int = 0) -> int:
    """Sign where ``chain`` ends now (its counter and that entry's id); returns that seq (0 for
    an empty chain).

    ``at_least`` is the highest seq this signer signed before (its own memory, out of reach of
    whoever writes Redis): a chain, or a checkpoint, that now ends before it raises
    :class:`ChainRolledBack` and nothing is signed, so the caller reports the rollback first.
    """
    head = log.head_seq(chain)
    current, _ = read_mark(log, key, chain, "checkpoint")
    if head == 0 and current is None:
        # Nothing at all: a new chain, or one wiped whole (stream, counter and marks: a Redis
        # flushed or replaced). Nothing to sign; what was signed before is no longer a floor.
        return 0
    signed_seq = int(current["seq"]) if current else 0
    if head < at_least or (current is not None and signed_seq < at_least):
        raise ChainRolledBack(
            f"audit chain {chain!r} ends at seq {head} (checkpoint at seq {signed_seq}) but seq "
            f"{at_least} was signed before: its tail was cut, or an old checkpoint put back"
        )
    if head == 0:
        return 0
    if current and signed_seq == head:
        return head
    stream = TenantKeys(chain).audit
    raw = log.state.run("audit checkpoint", lambda: log.state.client.xrevrange(stream, count=64))
    for raw_id, raw_fields in raw:
        fields = {_t(k): _t(v) for k, v in raw_fields.items()}
        if fields.get("seq") == str(head):
            body = {"seq": head, "id": _t(raw_id), "ts": now_ms()}
            write_mark(log, key, chain, "checkpoint", body)
            return head
    return signed_seq  # its last entry is not among the newest (being written): next round


def trim(log: AuditLog, key: bytes, chain: str, retention_ms: int) -> int:
    """Remove entries older than ``retention_ms``, after signing where the chain now starts.

    Returns the number of stream entries removed. The trim record is written first, so a trim
    cut short leaves entries the record already allows to be gone, never the reverse.

    The new start is the entry after the newest one older than the retention, and it is signed
    only if the chain is whole there: the first entry kept must be exactly that one (or, with
    none kept, the counter must end there). Entries someone removed are never signed away as
    trimmed; ``verify`` keeps naming them.
    """
    stream = TenantKeys(chain).audit
    cutoff = now_ms() - retention_ms
    client = log.state.client
    older = log.state.run(
        "audit trim", lambda: client.xrevrange(stream, max=f"({cutoff}-0", min="-", count=200)
    )
    newest_old = _first_seq(older)
    if newest_old is None:
        return 0  # nothing older than the retention (or nothing left of it: verify says so)
    first_seq = newest_old + 1
    newer = log.state.run(
        "audit trim", lambda: client.xrange(stream, min=f"{cutoff}-0", max="+", count=200)
    )
    first_kept = _first_seq(newer)
    if first_kept is None:
        first_kept = log.head_seq(chain) + 1
    if first_kept != first_seq:
        log_trim.warning(
            "audit chain %r: not trimmed: entries seq %s..%s are missing where it would start",
            chain,
            first_seq,
            first_kept - 1,
        )
        return 0
    current, _ = read_mark(log, key, chain, "trim")
    if current and int(current["first_seq"]) >= first_seq:
        return 0
    body = {
        "first_seq": first_seq,
        "min_id": f"{cutoff}-0",
        "ts": now_ms(),
        "retention_ms": retention_ms,
    }
    write_mark(log, key, chain, "trim", body)
    return int(
        log.state.run(
            "audit trim",
            lambda: log.state.client.xtrim(stream, minid=f"{cutoff}-0", approximate=False),
        )
    )


def adopt(
    log: AuditLog,
    key: bytes,
    chain: str,
    *,
    grace_ms: int,
    start: str = "-",
    window_ms: int | None = None,
) -> tuple[int, str]:
    """Seal entries of ``chain`` left unsealed for longer than ``grace_ms`` (their writer died),
    from ``start``; returns how many it sealed and where the next round should start.

    Ages are the entries' stream-id times, which no field edit moves. With ``window_ms``, only
    entries written within that much before the grace are adopted: a leader adopts an orphan
    within a round or two of its grace, so an older unsealed entry is not an orphan but an entry
    whose seal was removed (edited, perhaps), and sealing it would launder the edit; a new
    leader, which starts from the chain's beginning, would otherwise do just that."""
    cutoff = now_ms() - grace_ms
    oldest = None if window_ms is None else cutoff - window_ms
    unsealed: dict[int, AuditEntry] = {}
    next_start = start
    for entry in log.entries(chain, start=start):
        if entry.is_seal:
            for seq, _ in _seals(entry):
                unsealed.pop(seq, None)
            continue
        if entry.written_ms < cutoff:
            next_start = entry.id
        unsealed[entry.seq] = entry
    orphans = [
        e
        for e in unsealed.values()
        if e.written_ms < cutoff and (oldest is None or e.written_ms >= oldest)
    ]
    if not orphans:
        return 0, next_start
    seals = [[e.seq, seal_mac(key, chain, e.id, e.fields)] for e in orphans]
    writer = f"adopted by {log.sealer.writer}"
    keys = TenantKeys(chain).shared()
    args = AUDIT_APPEND.arrange({"entries": "", "record_ttl": ""})
    log.state.call(
        "audit adopt", log.state.scripts.audit_append, keys, [*args, json.dumps(seals), writer]
    )
    return len(orphans), next_start


def verify_all(
    log: AuditLog, key: bytes, chains: Iterable[str], *, seal_grace_ms: int = 30_000
) -> list[VerifyReport]:
    return [verify(log, key, chain, seal_grace_ms=seal_grace_ms) for chain in chains]


def _t(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
