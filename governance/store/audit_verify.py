"""Verifying an audit chain, and the marks that make a cut tail and a trimmed head visible.

A chain is a tenant's stream of numbered entries (``seq`` 1, 2, 3, ... assigned atomically with
each decision) and the seals that authenticate them (see :mod:`audit_seal`). :func:`verify`
walks it and names every break it finds:

- an entry whose seal does not match its content: it was **edited** (or its seal was);
- an entry without a valid sequence number (the scripts number every entry): **inserted**;
- a missing sequence number: entries were **removed** from the middle;
- a sequence number out of order or twice: entries were **reordered** or **inserted**;
- a sequence number above the chain's counter, on an entry older than the seal grace:
  **inserted** (an entry appended while ``verify`` runs is newer);
- a stream id ahead of the time (beyond ``CLOCK_SKEW_MS``): an entry **rewritten** under an id
  chosen by hand, which would otherwise pass for pending forever;
- an entry without a valid seal older than the seal grace plus the time the leader takes to
  adopt it (``adoption_ms``): **inserted** (a writer cannot forge a seal), or written by a
  process killed before it sealed it and never adopted;
- the chain's counter, or the newest signed **checkpoint**, beyond the last entry: the **tail
  was cut**;
- the first entry after the point the newest signed **trim record** allows: the **head was
  trimmed** beyond the retention;
- an ``audit_rolled_back`` entry: the maintenance leader found the chain ending before an entry
  it had seen (see :func:`watch`);
- with anchors (see :mod:`audit_anchor`): an anchored entry that is gone past the chain's end
  (**rolled back**), another entry at an anchored place (**rolled back and written again**),
  or a chain anchored but gone (**wiped**).

Entries appended while it runs are not judged (it reads the counter first), and entries younger
than the seal grace (plus ``adoption_ms``) are reported as pending, not as breaks: no false alarm
under load, nor after a writer was killed. Pending is bounded: an entry whose id is ahead of the
time is never pending.

The maintenance leader writes the marks: a checkpoint of every chain that moved (every
``checkpoint_s``), a trim record before it trims entries older than the retention, and seals
for entries whose writer died (``adopt``). Marks are HMAC'd with the audit key like seals.

What Redis alone cannot prove (a rollback: a tail cut with its counter reset and an older
checkpoint put back; a chain wiped whole), memory outside Redis can: the leader's (:func:`watch`,
which it records in the chain), each writer's (``audit_seal``, which logs it) and the anchors.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from governance.store.audit import AuditEntry, AuditLog, now_ms
from governance.store.audit_anchor import AnchorRecord
from governance.store.audit_seal import id_order, key_id, mark_mac, seal_mac
from governance.store.audit_types import AuditEventType
from governance.store.keys import TenantKeys
from governance.store.vocabulary import AUDIT_APPEND

log_trim = logging.getLogger("governance.audit")

#: How far ahead of the verifier's clock a stream id may be (the clocks of Redis and of the
#: verifier's host may differ by this much) before it counts as chosen by hand.
CLOCK_SKEW_MS = 5_000


@dataclass(frozen=True)
class Break:
    """One place where a chain does not hold."""

    entry: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on one chain: entries checked, still pending, adopted, and every break.

    ``macs_ok`` and ``macs_bad`` count the seals and marks that do and do not verify under the
    key: none verifying while some do not is what a wrong key looks like (:attr:`key_mismatch`).
    ``anchored`` counts the anchors compared, ``anchor_keys`` the audit key ids they name."""

    chain: str
    checked: int
    pending: int = 0
    adopted: int = 0
    breaks: tuple[Break, ...] = field(default=())
    macs_ok: int = 0
    macs_bad: int = 0
    anchored: int = 0
    anchor_keys: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def broken_entry(self) -> str | None:
        return self.breaks[0].entry if self.breaks else None

    @property
    def reason(self) -> str:
        return self.breaks[0].reason if self.breaks else ""

    @property
    def key_mismatch(self) -> bool:
        """No seal or mark of this chain verifies under the key, and some do not: the key is
        not the one the chain was sealed with (or every seal was replaced)."""
        return self.macs_bad > 0 and self.macs_ok == 0


def _mark(
    log: AuditLog, key: bytes, chain: str, kind: str
) -> tuple[dict[str, Any] | None, str, bool | None]:
    """A chain's newest mark of ``kind``, a problem, and whether its MAC verified (None when
    there is no mark or it is unreadable)."""
    marks_key = TenantKeys(chain).audit_marks
    raw = log.state.run("audit marks", lambda: log.state.client.hget(marks_key, kind))
    if raw is None:
        return None, "", None
    try:
        mark = json.loads(raw)
        body, mac = mark["body"], mark["mac"]
        text_ok = isinstance(body, dict)
    except (ValueError, KeyError, TypeError):
        text_ok = False
    if not text_ok:
        return None, f"the {kind} record of chain {chain!r} is unreadable (altered)", None
    if mark_mac(key, chain, kind, body) != mac:
        return (
            None,
            f"the {kind} record of chain {chain!r} does not match its seal (altered)",
            False,
        )
    return dict(body), "", True


def read_mark(
    log: AuditLog, key: bytes, chain: str, kind: str
) -> tuple[dict[str, Any] | None, str]:
    """A chain's newest mark of ``kind`` ("checkpoint" or "trim") and a problem, if any."""
    body, problem, _ = _mark(log, key, chain, kind)
    return body, problem


def write_mark(log: AuditLog, key: bytes, chain: str, kind: str, body: dict[str, Any]) -> None:
    marks_key = TenantKeys(chain).audit_marks
    value = json.dumps({"body": body, "mac": mark_mac(key, chain, kind, body)})
    log.state.run("audit marks", lambda: log.state.client.hset(marks_key, kind, value))


def when(ms: int) -> str:
    """Epoch milliseconds as a UTC time, for messages."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def verify(
    log: AuditLog,
    key: bytes,
    chain: str,
    *,
    seal_grace_ms: int = 30_000,
    adoption_ms: int = 0,
    anchors: Sequence[AnchorRecord] = (),
) -> VerifyReport:
    """Walk ``chain`` and report every break (see the module doc).

    ``adoption_ms``: how long after the grace the leader may take to adopt an entry whose writer
    was killed (an adoption round, or a leader change); an unsealed entry is a break only once
    older than both. ``anchors``: this chain's anchored checkpoints, to compare."""
    breaks: list[Break] = []
    macs_ok = macs_bad = 0
    trim, problem, trim_ok = _mark(log, key, chain, "trim")
    if problem:
        breaks.append(Break("(trim record)", problem))
    checkpoint, problem, checkpoint_ok = _mark(log, key, chain, "checkpoint")
    if problem:
        breaks.append(Break("(checkpoint)", problem))
    for status in (trim_ok, checkpoint_ok):
        macs_ok += status is True
        macs_bad += status is False
    try:
        head = log.head_seq(chain)
        counter_ok = True
    except ValueError:
        breaks.append(Break("(counter)", "the chain's counter is not a number: it was altered"))
        head, counter_ok = sys.maxsize, False
    now = now_ms()
    first_expected = int(trim["first_seq"]) if trim else 1
    trim_point = id_order(str(trim["min_id"])) if trim else None
    above_cutoff = now - seal_grace_ms
    unsealed_cutoff = now - seal_grace_ms - adoption_ms
    future_limit = now + CLOCK_SKEW_MS
    anchored_seqs = {r.seq for r in anchors}

    expected = first_expected
    seen_first: int | None = None
    unsealed: dict[int, AuditEntry] = {}
    ids_by_seq: dict[int, str] = {}
    macs_at: dict[int, str] = {}
    future: list[AuditEntry] = []
    rolled_back: list[AuditEntry] = []
    numbered = 0  # entries other than seals
    checked = adopted = 0
    last_seq = first_expected - 1
    for entry in log.entries(chain):
        if entry.is_seal:
            adopted_by = entry.fields.get("by", "").startswith("adopted")
            for sealed_seq, mac in _seals(entry):
                target = unsealed.pop(sealed_seq, None)
                if target is None:
                    continue
                if seal_mac(key, chain, target.id, target.fields) != mac:
                    macs_bad += 1
                    breaks.append(
                        Break(
                            target.id,
                            f"entry {target.id} (seq {sealed_seq}) does not match its seal: "
                            "it was altered",
                        )
                    )
                else:
                    macs_ok += 1
                    checked += 1
                    adopted += adopted_by
            continue
        numbered += 1
        if entry.written_ms > future_limit:
            future.append(entry)
        seq = entry.valid_seq
        if seq is None:
            shown = entry.fields.get("seq")
            breaks.append(
                Break(
                    entry.id,
                    f"entry {entry.id} has no valid sequence number (seq "
                    f"{'missing' if shown is None else repr(shown[:20])}): the scripts number "
                    "every entry, so it was inserted",
                )
            )
            continue
        if seq > head:
            if entry.written_ms < above_cutoff or entry.written_ms > future_limit:
                age = (
                    f"was written {(now - entry.written_ms) // 1000} s ago"
                    if entry.written_ms < above_cutoff
                    else "has a stream id ahead of the time"
                )
                breaks.append(
                    Break(
                        entry.id,
                        f"entry {entry.id} has seq {seq}, above the chain's counter ({head}), "
                        f"and {age}: inserted",
                    )
                )
            continue  # else appended since the counter was read: judged next time
        if seq in anchored_seqs:
            macs_at[seq] = seal_mac(key, chain, entry.id, entry.fields)
        if seq < first_expected:
            # Before the signed trim point and not trimmed yet: still sealed, and written
            # before that point.
            if trim_point is not None and id_order(entry.id) >= trim_point:
                breaks.append(
                    Break(
                        entry.id,
                        f"entry {entry.id} has seq {seq}, before the trim record's first seq "
                        f"{first_expected}, but was written after the trim point: inserted",
                    )
                )
            unsealed[seq] = entry
            continue
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
        if entry.fields.get("type") == AuditEventType.AUDIT_ROLLED_BACK:
            rolled_back.append(entry)
        unsealed[seq] = entry
    pending = 0
    for seq, entry in sorted(unsealed.items()):
        if entry.written_ms > future_limit:
            breaks.append(
                Break(
                    entry.id,
                    f"entry {entry.id} (seq {seq}) has no valid seal and a stream id "
                    f"{(entry.written_ms - now) // 1000} s ahead of the time: it was rewritten "
                    "under an id chosen by hand (to pass for pending), or came after one",
                )
            )
        elif entry.written_ms >= unsealed_cutoff:
            pending += 1
        else:
            breaks.append(
                Break(
                    entry.id,
                    f"entry {entry.id} (seq {seq}) has no valid seal: it was inserted, or its "
                    "writer was killed before sealing it and it was not adopted",
                )
            )
    sealed_future = [
        e
        for e in future
        if e.valid_seq is not None and e.valid_seq <= head and e.valid_seq not in unsealed
    ]
    if sealed_future:
        first = sealed_future[0]
        breaks.append(
            Break(
                first.id,
                f"entry {first.id} and {len(sealed_future) - 1} after it have stream ids ahead "
                "of the time: the stream's last id was moved forward (XSETID), so the ages of "
                "its entries cannot be trusted",
            )
        )
    for entry in rolled_back:
        breaks.append(Break(entry.id, f"entry {entry.id}: {entry.fields.get('reason', '')}"))
    if counter_ok and head > last_seq:
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
    ours = [r for r in anchors if r.key == key_id(key)]
    breaks += _anchor_breaks(
        chain,
        [r for r in ours if r.seq >= first_expected],
        macs_at,
        ids_by_seq,
        last_seq,
        empty=numbered == 0 and head in (0, sys.maxsize),  # (seals a writer owed may remain)
    )
    return VerifyReport(
        chain,
        checked,
        pending,
        adopted,
        tuple(breaks),
        macs_ok=macs_ok,
        macs_bad=macs_bad,
        anchored=len(ours),
        anchor_keys=frozenset(r.key for r in anchors),
    )


def _anchor_breaks(
    chain: str,
    anchors: Sequence[AnchorRecord],
    macs_at: dict[int, str],
    ids_by_seq: dict[int, str],
    last_seq: int,
    *,
    empty: bool,
) -> list[Break]:
    """What the anchors (past the trim point, made with this key) say about the chain."""
    if not anchors:
        return []
    newest = max(anchors, key=lambda r: r.seq)
    if empty:
        return [
            Break(
                "(anchors)",
                f"chain {chain!r} was anchored up to seq {newest.seq} on {when(newest.time_ms)} "
                f"({newest.source}), but it is gone: it was wiped (stream, counter and marks)",
            )
        ]
    found: list[Break] = []
    beyond = [r for r in anchors if r.seq > last_seq]
    if beyond:
        top = max(beyond, key=lambda r: r.seq)
        found.append(
            Break(
                "(anchors)",
                f"seq {top.seq} (entry {top.id}) was anchored on {when(top.time_ms)} "
                f"({top.source}), but the chain ends at seq {last_seq}: it was rolled back "
                "(entries cut and the counter reset), or wiped and started again",
            )
        )
    differ = sorted(
        (r for r in anchors if r.seq in macs_at and macs_at[r.seq] != r.head),
        key=lambda r: r.seq,
    )
    if differ:
        first = differ[0]
        found.append(
            Break(
                ids_by_seq.get(first.seq, "(anchors)"),
                f"the entry at seq {first.seq} is not the one anchored on {when(first.time_ms)} "
                f"({first.source}, entry {first.id}): the chain was rolled back and written "
                "again",
            )
        )
    return found


def _first_seq(rows: Iterable[tuple[Any, dict[Any, Any]]]) -> int | None:
    """The seq of the first decision entry in ``rows`` (raw stream rows; seal entries and
    entries without a valid seq skipped)."""
    for raw_id, raw_fields in rows:
        seq = AuditEntry("", _t(raw_id), {_t(k): _t(v) for k, v in raw_fields.items()}).valid_seq
        if seq is not None:
            return seq
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
        # flushed or replaced). Nothing to sign (the leader's watch reports a wiped chain).
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
    entry_id = _id_of(log, chain, head)
    if entry_id is None:
        return signed_seq  # its last entry is not among the newest (being written): next round
    write_mark(log, key, chain, "checkpoint", {"seq": head, "id": entry_id, "ts": now_ms()})
    return head


def _id_of(log: AuditLog, chain: str, seq: int) -> str | None:
    """The stream id of the entry ``seq`` if it is among the chain's newest entries."""
    stream = TenantKeys(chain).audit
    raw = log.state.run("audit read", lambda: log.state.client.xrevrange(stream, count=64))
    for raw_id, raw_fields in raw:
        if _t(raw_fields.get(b"seq", raw_fields.get("seq", b""))) == str(seq):
            return _t(raw_id)
    return None


def anchor_of(log: AuditLog, key: bytes, chain: str) -> AnchorRecord | None:
    """The anchor of the chain's signed checkpoint as it stands (None without a valid one, or
    when its entry is gone): chain, seq, entry id, that entry's seal MAC, the key's id, now."""
    mark, _ = read_mark(log, key, chain, "checkpoint")
    if mark is None:
        return None
    entry = log.entry(chain, str(mark["id"]))
    if entry is None or entry.valid_seq != int(mark["seq"]):
        return None
    return AnchorRecord(
        chain=chain,
        seq=int(mark["seq"]),
        id=entry.id,
        head=seal_mac(key, chain, entry.id, entry.fields),
        key=key_id(key),
        time_ms=now_ms(),
    )


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


@dataclass
class AdoptionCursor:
    """What one leader read of a chain for adoption: where it stopped, and the entries it saw
    unsealed so far. Each entry is so read once (the leader's steady-state cost), not once per
    round until its grace is over."""

    read_to: str = "-"
    unsealed: dict[int, AuditEntry] = field(default_factory=dict)


def adopt(
    log: AuditLog,
    key: bytes,
    chain: str,
    *,
    grace_ms: int,
    cursor: AdoptionCursor | None = None,
    window_ms: int | None = None,
) -> int:
    """Seal entries of ``chain`` left unsealed for longer than ``grace_ms`` (their writer died);
    returns how many it sealed. With ``cursor`` (a leader's, kept between rounds) only the
    entries written since its last round are read.

    Ages are the entries' stream-id times, which no field edit moves. With ``window_ms``, only
    entries written within that much before the grace are adopted: a leader adopts an orphan
    within a round or two of its grace, so an older unsealed entry is not an orphan but an entry
    whose seal was removed (edited, perhaps), and sealing it would launder the edit; a new
    leader, which starts from the chain's beginning, would otherwise do just that. Only what a
    script could have written is adopted: an entry with a valid seq within the chain's counter,
    whose id is not ahead of the time."""
    cursor = cursor if cursor is not None else AdoptionCursor()
    now = now_ms()
    cutoff = now - grace_ms
    oldest = None if window_ms is None else cutoff - window_ms
    start = "-" if cursor.read_to == "-" else f"({cursor.read_to}"
    for entry in log.entries(chain, start=start):
        cursor.read_to = entry.id
        if entry.is_seal:
            for sealed_seq, _ in _seals(entry):
                cursor.unsealed.pop(sealed_seq, None)
            continue
        seq = entry.valid_seq
        if seq is not None and entry.written_ms <= now + CLOCK_SKEW_MS:
            cursor.unsealed[seq] = entry
    # Read after the entries: every entry a script wrote is within it (its counter moves first).
    head = log.head_seq(chain)
    orphans = []
    for seq, entry in list(cursor.unsealed.items()):
        if seq > head or (oldest is not None and entry.written_ms < oldest):
            del cursor.unsealed[seq]  # above the counter, or too old to be an orphan
        elif entry.written_ms < cutoff:
            orphans.append(entry)
            del cursor.unsealed[seq]
    if not orphans:
        return 0
    seals = [[e.seq, seal_mac(key, chain, e.id, e.fields)] for e in orphans]
    writer = f"adopted by {log.sealer.writer}"
    keys = TenantKeys(chain).shared()
    args = AUDIT_APPEND.arrange({"entries": "", "record_ttl": ""})
    log.state.call(
        "audit adopt", log.state.scripts.audit_append, keys, [*args, json.dumps(seals), writer]
    )
    return len(orphans)


@dataclass(frozen=True)
class Head:
    """Where a chain ended when someone looked: its counter and that entry's stream id."""

    seq: int
    id: str


@dataclass(frozen=True)
class RolledBack:
    """A chain found ending before an entry seen earlier: ``cut`` (older entries are still
    there: its tail was cut and its counter reset) or wiped whole (stream, counter and marks)."""

    chain: str
    seen: Head
    now_seq: int
    cut: bool

    @property
    def message(self) -> str:
        if self.cut:
            return (
                f"audit chain {self.chain!r} ends at seq {self.now_seq}, but seq {self.seen.seq} "
                f"(entry {self.seen.id}) was there before: entries were cut and the counter "
                "reset (or the state Redis lost writes)"
            )
        return (
            f"audit chain {self.chain!r} was wiped: it ended at seq {self.seen.seq} (entry "
            f"{self.seen.id}) and now starts again from nothing (seq {self.now_seq}): its "
            "stream, counter and marks were removed (a Redis flushed or replaced?)"
        )


def watch(log: AuditLog, chain: str, seen: Head | None) -> tuple[Head | None, RolledBack | None]:
    """Where ``chain`` ends now, and whether it went back since ``seen`` (the watcher's own
    memory, out of reach of whoever writes Redis). A chain whose oldest entry is older than
    the entry seen was cut; one whose entries are all newer (or none) was wiped and maybe
    started again. After a rollback, what it ends at now is the new memory. An entry whose id
    is ahead of the time is never remembered (its order with later ones means nothing)."""
    head = log.head_seq(chain)
    ahead = now_ms() + CLOCK_SKEW_MS
    if seen is not None and id_order(seen.id)[0] > ahead:
        seen = None  # an id moved ahead of the time (verify names it) tells nothing
    if seen is not None and head == seen.seq:
        return seen, None
    rolled_back = None
    if seen is not None and head < seen.seq:
        first = log.first_id(chain)
        cut = first is not None and id_order(first) < id_order(seen.id)
        rolled_back = RolledBack(chain, seen, head, cut)
    if head == 0:
        return None, rolled_back
    entry_id = _id_of(log, chain, head)
    if entry_id is None or id_order(entry_id)[0] > ahead:
        return (None if rolled_back else seen), rolled_back  # being written: next time
    return Head(head, entry_id), rolled_back


def verify_all(
    log: AuditLog,
    key: bytes,
    chains: Iterable[str],
    *,
    seal_grace_ms: int = 30_000,
    adoption_ms: int = 0,
    anchors: Sequence[AnchorRecord] = (),
) -> list[VerifyReport]:
    """:func:`verify` of each chain, each with its own anchors."""
    return [
        verify(
            log,
            key,
            chain,
            seal_grace_ms=seal_grace_ms,
            adoption_ms=adoption_ms,
            anchors=[r for r in anchors if r.chain == chain],
        )
        for chain in chains
    ]


def _t(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: What :func:`seal_states` says of an entry.
SEALED, PENDING, ALTERED, UNSEALED = "sealed", "pending", "altered", "unsealed"


def seal_states(
    log: AuditLog, key: bytes, entries: Sequence[AuditEntry], *, unsealed_after_ms: int
) -> dict[str, str]:
    """Whether each of ``entries`` (by id) has a valid seal: ``sealed``; ``altered`` (a seal
    that does not match); ``pending`` (none yet, and younger than ``unsealed_after_ms``);
    ``unsealed`` (none, older, or no valid seq, or an id ahead of the time: not written by
    governance). For showing entries (``govctl audit tail``); :func:`verify` judges chains."""
    now = now_ms()
    states: dict[str, str] = {}
    by_chain: dict[str, list[AuditEntry]] = {}
    for entry in entries:
        by_chain.setdefault(entry.chain, []).append(entry)
    for chain, shown in by_chain.items():
        oldest = min(shown, key=lambda e: id_order(e.id)).id
        seals: dict[int, list[str]] = {}
        for entry in log.entries(chain, start=oldest):
            if entry.is_seal:
                for sealed_seq, mac in _seals(entry):
                    seals.setdefault(sealed_seq, []).append(mac)
        for entry in shown:
            seq = entry.valid_seq
            macs = seals.get(seq, []) if seq is not None else []
            if seq is None or entry.written_ms > now + CLOCK_SKEW_MS:
                states[entry.id] = UNSEALED
            elif seal_mac(key, chain, entry.id, entry.fields) in macs:
                states[entry.id] = SEALED
            elif macs:
                states[entry.id] = ALTERED
            elif entry.written_ms >= now - unsealed_after_ms:
                states[entry.id] = PENDING
            else:
                states[entry.id] = UNSEALED
    return states
