"""The audit chains: sealed entries from many writers, and every kind of tampering named."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from governance.store import AuditEvent, AuditEventType, AuditLog, StateStore, audit_verify
from governance.store.audit import AuditEntry
from governance.store.audit_seal import AuditSealer, parse_written, seal_mac
from governance.store.keys import TenantKeys
from governance.store.vocabulary import AUDIT_APPEND

KEY = b"test-audit-key"
STREAM = TenantKeys("acme").audit
SPAWN = multiprocessing.get_context("spawn")


def _event(i: int, tenant: str = "acme") -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.ADMITTED,
        tenant=tenant,
        agent="bot",
        run="run-1",
        task_id=f"t{i}",
        action="echo",
        decision="allow",
        tier="act_auto",
        policy_version="v1",
        detail={"i": i},
    )


def _log(state: StateStore, key: bytes = KEY) -> AuditLog:
    return AuditLog(state, AuditSealer(key))


def _fill(state: StateStore, n: int) -> list[str]:
    log = _log(state)
    return [i for k in range(n) for i in log.append(_event(k))]


def _records(client: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(i, f) for i, f in client.xrange(STREAM) if f.get(b"type") != b"seal"]


def _verify(state: StateStore, **kwargs: Any) -> audit_verify.VerifyReport:
    return audit_verify.verify(_log(state), KEY, "acme", **kwargs)


def _append_many(url: str, writer: int, n: int) -> None:
    state = StateStore(redis.Redis.from_url(url))
    log = _log(state)
    for i in range(n):
        log.append(_event(writer * 10_000 + i), _event(writer * 10_000 + i + 5_000))


@pytest.mark.timeout(120)
def test_eight_processes_appending_lose_no_entry(redis_url: str, redis_client: redis.Redis) -> None:
    processes = [SPAWN.Process(target=_append_many, args=(redis_url, w, 60)) for w in range(8)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(100)
        assert p.exitcode == 0
    report = _verify(StateStore(redis_client))
    assert report.ok, report.reason
    assert report.checked == 8 * 60 * 2
    seqs = sorted(int(f[b"seq"]) for _, f in _records(redis_client))
    assert seqs == list(range(1, 8 * 60 * 2 + 1))


def test_wrong_key_fails_verification(state: StateStore) -> None:
    _fill(state, 3)
    report = audit_verify.verify(_log(state, b"another-key"), b"another-key", "acme")
    assert not report.ok
    assert "altered" in report.reason


def test_an_edited_entry_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    _fill(state, 5)
    target, _fields = _records(redis_client)[2]
    # Streams are append-only: an edit is a delete and a re-insert under the same id.
    everything = redis_client.xrange(STREAM)
    redis_client.delete(STREAM)
    for entry_id, values in everything:
        if entry_id == target:
            values = {**values, b"reason": b"nothing to see"}
        redis_client.xadd(STREAM, values, id=entry_id)
    report = _verify(state)
    assert not report.ok
    assert report.broken_entry == target.decode()
    assert "altered" in report.reason


def test_a_removed_entry_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    _fill(state, 5)
    removed = _records(redis_client)[2][0]
    redis_client.xdel(STREAM, removed)
    report = _verify(state)
    assert not report.ok
    assert "seq 3..3 are missing" in report.reason
    assert "removed" in report.reason


def test_a_reordered_entry_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    _fill(state, 5)
    moved_id, moved = _records(redis_client)[1]
    redis_client.xdel(STREAM, moved_id)
    redis_client.xadd(STREAM, moved)  # put back at the end, under a new id
    report = _verify(state)
    reasons = " / ".join(b.reason for b in report.breaks)
    assert not report.ok
    assert "missing" in reasons
    assert "reordered or inserted" in reasons


def test_an_inserted_entry_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    _fill(state, 3)
    # An attacker with Redis access appends a plausible entry and bumps the counter: it has no
    # seal, and nobody without the key can make one.
    forged = redis_client.xadd(
        STREAM, {"seq": "4", "ts": "1", "type": "released", "tenant": "acme", "task_id": "x"}
    )
    redis_client.hincrby(TenantKeys("acme").meta, "audit_seq", 1)
    # Pending while within the seal grace (judged by when Redis wrote it, not by its ts) ...
    assert _verify(state).pending == 1
    time.sleep(0.01)
    # ... then named.
    report = _verify(state, seal_grace_ms=5)
    assert not report.ok
    assert report.broken_entry == forged.decode()
    assert "inserted" in report.reason


def test_a_cut_tail_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    _fill(state, 6)
    log = _log(state)
    assert audit_verify.checkpoint(log, KEY, "acme") == 6
    records = _records(redis_client)
    # Cut the last two entries (and their seals) and set the counter back.
    for entry_id, _ in redis_client.xrange(STREAM, min=records[-2][0]):
        redis_client.xdel(STREAM, entry_id)
    redis_client.hset(TenantKeys("acme").meta, "audit_seq", 4)
    report = _verify(state)
    assert not report.ok
    assert "tail was cut" in report.reason
    # Without resetting the counter, the counter alone shows it.
    redis_client.hset(TenantKeys("acme").meta, "audit_seq", 6)
    assert "tail was cut" in _verify(state).reason


def test_a_signer_never_signs_over_a_chain_rolled_back_below_what_it_signed(
    state: StateStore, redis_client: redis.Redis
) -> None:
    log = _log(state)
    _fill(state, 6)
    assert audit_verify.checkpoint(log, KEY, "acme") == 6
    old_checkpoint = redis_client.hget(TenantKeys("acme").audit_marks, "checkpoint")
    _fill(state, 2)
    assert audit_verify.checkpoint(log, KEY, "acme", at_least=6) == 8
    # The tail cut back to seq 6, the counter reset, the old checkpoint put back: verify alone
    # sees a whole chain, but the signer that signed seq 8 refuses it.
    for entry_id, _ in redis_client.xrange(STREAM, min=_records(redis_client)[-2][0]):
        redis_client.xdel(STREAM, entry_id)
    redis_client.hset(TenantKeys("acme").meta, "audit_seq", 6)
    redis_client.hset(TenantKeys("acme").audit_marks, "checkpoint", old_checkpoint)
    assert _verify(state).ok
    with pytest.raises(audit_verify.ChainRolledBack, match=r"ends at seq 6 .* seq 8 was signed"):
        audit_verify.checkpoint(log, KEY, "acme", at_least=8)
    # A chain wiped whole (a Redis flushed) starts again from nothing.
    redis_client.delete(STREAM, TenantKeys("acme").audit_marks, TenantKeys("acme").meta)
    assert audit_verify.checkpoint(log, KEY, "acme", at_least=8) == 0


def test_a_trimmed_head_is_named_and_a_recorded_trim_is_not(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 4)
    time.sleep(0.05)
    _fill(state, 2)
    first_kept = _records(redis_client)[4][0]
    # Trimmed by the retention, through the trim record: verifies.
    cutoff_age_ms = int(time.time() * 1000) - int(first_kept.split(b"-")[0]) + 1
    assert audit_verify.trim(_log(state), KEY, "acme", cutoff_age_ms) > 0
    assert _verify(state).ok, _verify(state).reason
    # Trimmed by hand beyond it: named.
    redis_client.xdel(STREAM, first_kept)
    report = _verify(state)
    assert not report.ok
    assert "head was trimmed" in report.reason


def test_the_retention_trim_never_signs_away_entries_someone_removed(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 6)
    ids = [entry_id for entry_id, fields in _records(redis_client) if b"seq" in fields]
    # Removed by hand from the head, though none is older than the retention (a year).
    for entry_id in ids[:4]:
        redis_client.xdel(STREAM, entry_id)
    assert audit_verify.trim(_log(state), KEY, "acme", 365 * 86_400_000) == 0
    report = _verify(state)
    assert not report.ok
    assert "seq 1..4 are missing" in report.reason
    # The first entry the retention keeps, removed: the trim refuses to start the chain after
    # it, and verify names it.
    time.sleep(0.5)
    _fill(state, 2)
    seq7 = next(i for i, f in _records(redis_client) if f[b"seq"] == b"7")
    # The retention's cutoff 250 ms before seq 7 (seq 6 is 500 ms older): it stays between the
    # two however long the calls below take on a loaded machine (a cutoff 1 ms before seq 7
    # passed it, and the trim went on).
    cutoff_age_ms = int(time.time() * 1000) - int(seq7.split(b"-")[0]) + 250
    redis_client.xdel(STREAM, seq7)
    assert audit_verify.trim(_log(state), KEY, "acme", cutoff_age_ms) == 0
    report = _verify(state)
    assert any("seq 7..7 are missing" in b.reason for b in report.breaks), report.breaks


def test_verify_gives_no_false_alarm_while_appends_go_on(state: StateStore) -> None:
    stop = threading.Event()
    log = _log(state)

    def append() -> None:
        i = 0
        while not stop.is_set():
            log.append(_event(i))
            i += 1

    writer = threading.Thread(target=append)
    writer.start()
    try:
        reports = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            reports.append(_verify(state))
    finally:
        stop.set()
        writer.join()
    assert len(reports) > 3
    assert all(r.ok for r in reports), [r.reason for r in reports if not r.ok]
    assert reports[-1].checked > reports[0].checked


def test_an_entry_rewritten_without_its_seal_is_named_whatever_its_ts_and_never_adopted(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 1)
    ((entry_id, fields),) = _records(redis_client)
    # The stream rebuilt by hand: the entry under its own id, edited, its ts far in the future
    # (to look "pending"), its seal left out.
    edited = {**fields, b"reason": b"nothing to see", b"ts": b"9999999999999"}
    redis_client.delete(STREAM)
    redis_client.xadd(STREAM, edited, id=entry_id)
    time.sleep(0.01)
    # A leader adopts orphans only within its window after the grace: not this one.
    assert audit_verify.adopt(_log(state), KEY, "acme", grace_ms=5, window_ms=0) == 0
    report = _verify(state, seal_grace_ms=5)
    assert report.pending == 0
    assert report.broken_entry == entry_id.decode()
    assert "has no valid seal" in report.reason


def test_entries_of_a_killed_writer_are_pending_then_adopted(state: StateStore) -> None:
    sealer = AuditSealer(KEY)
    log = AuditLog(state, sealer)
    entries = '[{"type": "admitted", "tenant": "acme", "task_id": "orphan"}]'
    keys = TenantKeys("acme").shared()
    args = AUDIT_APPEND.arrange({"entries": entries, "record_ttl": ""})
    state.call("audit append", state.scripts.audit_append, keys, [*args, "[]", "killed"])
    # The writer died without sealing: young, the entry is pending; past the grace, unsealed.
    assert _verify(state).ok
    assert _verify(state).pending == 1
    time.sleep(0.05)
    assert "no valid seal" in _verify(state, seal_grace_ms=10).reason
    adopted = audit_verify.adopt(log, KEY, "acme", grace_ms=10)
    assert adopted == 1
    report = _verify(state, seal_grace_ms=10)
    assert report.ok
    assert report.adopted == 1


def test_a_leaders_cursor_reads_each_entry_once_and_adopts_when_the_grace_is_over(
    state: StateStore,
) -> None:
    """The leader's steady-state cost: each round reads only what was written since the last,
    remembering what it saw unsealed; an orphan is adopted once its grace is over."""
    log = AuditLog(state, AuditSealer(KEY))
    keys = TenantKeys("acme").shared()
    entries = '[{"type": "admitted", "tenant": "acme", "task_id": "orphan"}]'
    args = AUDIT_APPEND.arrange({"entries": entries, "record_ttl": ""})
    read: list[str] = []
    entries_of = log.entries

    def counted(chain: str, page_size: int = 1000, start: str = "-") -> Iterator[AuditEntry]:
        for entry in entries_of(chain, page_size, start):
            read.append(entry.id)
            yield entry

    log.entries = counted  # type: ignore[method-assign]
    cursor = audit_verify.AdoptionCursor()
    state.call("audit append", state.scripts.audit_append, keys, [*args, "[]", "killed"])
    log.append(AuditEvent(type=AuditEventType.ADMITTED, tenant="acme", task_id="sealed"))
    assert audit_verify.adopt(log, KEY, "acme", grace_ms=60_000, cursor=cursor) == 0
    assert len(cursor.unsealed) == 1  # the orphan; the other one's seal was read too
    first_round = len(read)
    assert audit_verify.adopt(log, KEY, "acme", grace_ms=60_000, cursor=cursor) == 0
    assert len(read) == first_round  # nothing new: nothing read again
    time.sleep(0.02)
    assert audit_verify.adopt(log, KEY, "acme", grace_ms=10, cursor=cursor) == 1
    assert len(read) == first_round
    assert cursor.unsealed == {}
    assert _verify(state, seal_grace_ms=10).ok


def test_tail_returns_newest_entries_in_order(state: StateStore) -> None:
    _fill(state, 5)
    tail = _log(state).tail(["acme"], 3)
    assert [e.fields["task_id"] for e in tail] == ["t2", "t3", "t4"]


def test_chains_of_several_tenants_on_a_cluster(redis_cluster_client: object) -> None:
    state = StateStore(redis_cluster_client)
    log = _log(state)
    tenants = ["acme", "beta", "gamma", "delta"]
    for i in range(20):
        log.append(*(_event(i, tenant=t) for t in tenants))
    slots = {redis_cluster_client.keyslot(TenantKeys(t).audit) for t in tenants}  # type: ignore[attr-defined]
    assert len(slots) > 1  # the chains spread over the cluster
    for tenant in tenants:
        report = audit_verify.verify(log, KEY, tenant)
        assert report.ok, report.reason
        assert report.checked == 20


def _admit_until_killed(url: str, ready: Any) -> None:
    from governance.store.admission import Admitter
    from governance.store.limits import AdmissionLimits
    from tests.store.helpers import TOOL_STEP, ctx, tool

    state = StateStore(redis.Redis.from_url(url))
    admitter = Admitter(state, AuditSealer(KEY))
    ready.set()
    i = 0
    while True:
        admitter.admit(
            ctx=ctx(),
            action=tool(),
            task_id=f"k{i}",
            attempt=0,
            estimate=TOOL_STEP,
            limits=AdmissionLimits(),
        )
        i += 1


def test_a_decision_and_its_entry_are_one_even_when_the_writer_is_killed(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ready = SPAWN.Event()
    writer = SPAWN.Process(target=_admit_until_killed, args=(redis_url, ready))
    writer.start()
    assert ready.wait(20)
    time.sleep(0.5)
    assert writer.pid is not None
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(10)
    admitted = {
        key.decode().rsplit(":", 1)[1]
        for key in redis_client.scan_iter(match="gov:{acme}:task:*")
        if redis_client.hget(key, "where") == b"running"
    }
    recorded = {
        f[b"task_id"].decode() for _, f in _records(redis_client) if f.get(b"type") == b"admitted"
    }
    assert len(admitted) > 10
    assert admitted == recorded  # every admission has its entry, and no entry lacks one
    # The killed writer's last seals never went out: the leader adopts them.
    state = StateStore(redis_client)
    assert audit_verify.adopt(_log(state), KEY, "acme", grace_ms=0) >= 0
    report = _verify(state, seal_grace_ms=0)
    assert report.ok, report.reason
    assert report.checked == len(recorded)


def test_an_entry_edited_before_its_seal_went_out_is_named(
    state: StateStore, redis_client: redis.Redis
) -> None:
    """Seals are computed when they are taken, from the script's reply kept in memory: an edit
    made in Redis between the write and the seal still shows."""
    from governance.store.admission import Admitter
    from governance.store.limits import AdmissionLimits
    from tests.store.helpers import TOOL_STEP, ctx, tool

    sealer = AuditSealer(KEY)
    admitter = Admitter(state, sealer)
    admitted = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="t-edited",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
    )
    assert admitted.admitted
    ((target, fields),) = _records(redis_client)  # written, its seal still owed
    # Streams are append-only: an edit is a delete and a re-insert under the same id.
    redis_client.delete(STREAM)
    redis_client.xadd(STREAM, {**fields, b"decision": b"deny"}, id=target)
    AuditLog(state, sealer).flush("acme")
    report = _verify(state)
    assert not report.ok
    assert report.broken_entry == target.decode()
    assert "altered" in report.reason


def test_a_template_field_edited_before_its_seal_went_out_is_named(
    state: StateStore, redis_client: redis.Redis
) -> None:
    """A task's entry comes back from its script without the audit template the caller sent
    (``[id, fields, 1]``); the seal covers the caller's own copy of it, so whoever writes the
    state Redis cannot change who or what an entry names (here: its task) before it is sealed."""
    from governance.store.admission import Admitter
    from governance.store.limits import AdmissionLimits
    from tests.store.helpers import TOOL_STEP, ctx, tool

    sealer = AuditSealer(KEY)
    admitted = Admitter(state, sealer).admit(
        ctx=ctx(),
        action=tool(),
        task_id="t-named",
        attempt=0,
        estimate=TOOL_STEP,
        limits=AdmissionLimits(),
        template={"tenant": "acme", "agent": "a1", "task_id": "t-named"},
    )
    assert admitted.admitted
    ((target, fields),) = _records(redis_client)  # written, its seal still owed
    assert fields[b"task_id"] == b"t-named"
    assert fields[b"agent"] == b"a1"
    redis_client.delete(STREAM)
    redis_client.xadd(STREAM, {**fields, b"task_id": b"t-someone-else"}, id=target)
    AuditLog(state, sealer).flush("acme")
    report = _verify(state)
    assert not report.ok
    assert report.broken_entry == target.decode()
    assert "altered" in report.reason


def test_a_task_entry_is_completed_with_the_template_the_caller_sent() -> None:
    flat = ["seq", "1", "ts", "5", "type", "admitted"]
    template = {"tenant": "acme", "agent": "a1", "reviewer": ""}
    ((entry_id, fields),) = parse_written([["1-0", flat, 1]], template)
    assert (entry_id, fields) == (
        "1-0",
        {"seq": "1", "ts": "5", "type": "admitted", "tenant": "acme", "agent": "a1"},
    )
    with pytest.raises(ValueError, match="template"):
        parse_written([["1-0", flat, 1]])  # the caller must give the template it sent


def test_seals_taken_together_are_those_of_each_entry_as_written() -> None:
    sealer = AuditSealer(KEY)
    flat = ["seq", "1", "ts", "5", "type", "admitted"]
    written: list[Any] = [["1-0", flat], ["1-1", ["seq", "2", "ts", "6", "type", "task_finished"]]]
    sealer.wrote("acme", written)
    flat[5] = "forged"  # the caller's reply changing afterwards changes nothing
    seals = json.loads(sealer.take("acme"))
    assert seals == [
        [1, seal_mac(KEY, "acme", "1-0", {"seq": "1", "ts": "5", "type": "admitted"})],
        [2, seal_mac(KEY, "acme", "1-1", {"seq": "2", "ts": "6", "type": "task_finished"})],
    ]
    assert sealer.take("acme") == "[]"  # taken once


# -- no blind spots ---------------------------------------------------------------------------


def _rebuild(client: redis.Redis, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """The stream rebuilt by hand from ``rows`` (id, fields): how anyone who can write Redis
    edits a stream (it is append-only)."""
    client.delete(STREAM)
    for entry_id, fields in rows:
        client.xadd(STREAM, fields, id=entry_id)


def test_an_entry_without_a_seq_is_named_at_once(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 2)
    for seq in (None, b"", b"01", b"x", b"-3"):
        fields = {b"type": b"approved", b"tenant": b"acme", b"reviewer": b"alice"}
        if seq is not None:
            fields[b"seq"] = seq
        forged = redis_client.xadd(STREAM, fields)
        report = _verify(state)  # no grace for it: the scripts number every entry
        assert report.broken_entry == forged.decode(), seq
        assert "has no valid sequence number" in report.reason
        assert "inserted" in report.reason
        redis_client.xdel(STREAM, forged)
    assert _verify(state).ok
    # The leader never seals one.
    redis_client.xadd(STREAM, {b"type": b"approved", b"tenant": b"acme"})
    time.sleep(0.01)
    assert audit_verify.adopt(_log(state), KEY, "acme", grace_ms=0) == 0


def test_an_entry_above_the_counter_is_named_once_older_than_the_grace(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 2)
    forged = redis_client.xadd(STREAM, {b"seq": b"9", b"type": b"approved", b"tenant": b"acme"})
    # Young, it may be an entry appended since the counter was read: not judged yet.
    assert _verify(state).ok
    time.sleep(0.02)
    report = _verify(state, seal_grace_ms=10)
    assert report.broken_entry == forged.decode()
    assert "above the chain's counter (2)" in report.reason
    # Nor is it adopted: no script wrote it.
    assert audit_verify.adopt(_log(state), KEY, "acme", grace_ms=0) == 0


def test_an_entry_rewritten_under_a_future_id_is_named_and_never_pending(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 3)
    rows = redis_client.xrange(STREAM)
    last_id, last = _records(redis_client)[-1]
    # The newest entry edited, put back under an id a year ahead, its seal left out: it would
    # pass for "just written" for a year.
    kept = [(i, f) for i, f in rows if i < last_id]
    future = f"{int(time.time() * 1000) + 365 * 86_400_000}-0"
    _rebuild(redis_client, [*kept, (future.encode(), {**last, b"reviewer": b"mallory"})])
    report = _verify(state, seal_grace_ms=60_000, adoption_ms=60_000)
    assert report.pending == 0
    assert report.broken_entry == future
    assert "ahead of the time: it was rewritten" in report.reason
    assert audit_verify.adopt(_log(state), KEY, "acme", grace_ms=0) == 0
    # Entries written after it (the stream's id is in the future now) are sealed, and named
    # once: their ages cannot be trusted.
    _fill(state, 2)
    reasons = [b.reason for b in _verify(state).breaks]
    assert any("ahead of the time: it was rewritten" in r for r in reasons)
    assert any("1 after it have stream ids ahead of the time" in r for r in reasons), reasons


def test_an_unsealed_entry_is_pending_for_the_grace_and_the_adoption_time(
    state: StateStore,
) -> None:
    entries = '[{"type": "admitted", "tenant": "acme", "task_id": "orphan"}]'
    keys = TenantKeys("acme").shared()
    args = AUDIT_APPEND.arrange({"entries": entries, "record_ttl": ""})
    state.call("audit append", state.scripts.audit_append, keys, [*args, "[]", "killed"])
    time.sleep(0.05)
    # Past the grace, but within the time the leader may take to adopt it: pending.
    report = _verify(state, seal_grace_ms=10, adoption_ms=60_000)
    assert report.ok
    assert report.pending == 1
    assert "no valid seal" in _verify(state, seal_grace_ms=10, adoption_ms=10).reason


def test_a_wrong_key_reads_as_a_key_mismatch_and_replaced_seals_as_tampering(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 3)
    assert audit_verify.checkpoint(_log(state), KEY, "acme") == 3
    right = _verify(state)
    assert (right.macs_ok, right.macs_bad, right.key_mismatch) == (4, 0, False)
    wrong = audit_verify.verify(_log(state), b"another-key", "acme")
    assert (wrong.macs_ok, wrong.macs_bad, wrong.key_mismatch) == (0, 4, True)
    # The right key over a chain whose every seal was replaced looks the same from this chain
    # alone: govctl tells them apart across chains and with the anchors.
    rows = [
        (i, {**f, b"seals": b'[[1,"00"],[2,"00"],[3,"00"]]'} if f[b"type"] == b"seal" else f)
        for i, f in redis_client.xrange(STREAM)
    ]
    _rebuild(redis_client, rows)
    assert _verify(state).checked == 0
    assert _verify(state).macs_ok == 1  # the checkpoint still verifies: the key is right


def test_the_leader_watch_tells_a_cut_from_a_wipe(
    state: StateStore, redis_client: redis.Redis
) -> None:
    log = _log(state)
    _fill(state, 5)
    seen, rolled_back = audit_verify.watch(log, "acme", None)
    assert rolled_back is None
    assert seen is not None
    assert seen.seq == 5
    assert audit_verify.watch(log, "acme", seen) == (seen, None)
    # Cut to seq 3 with the counter reset: older entries are still there.
    for entry_id, _ in redis_client.xrange(STREAM, min=_records(redis_client)[3][0]):
        redis_client.xdel(STREAM, entry_id)
    redis_client.hset(TenantKeys("acme").meta, "audit_seq", 3)
    after, rolled_back = audit_verify.watch(log, "acme", seen)
    assert rolled_back is not None
    assert rolled_back.cut
    assert "ends at seq 3, but seq 5" in rolled_back.message
    assert after is not None
    assert after.seq == 3
    # Wiped whole, and started again: a new chain, not a cut.
    redis_client.delete(STREAM, TenantKeys("acme").meta, TenantKeys("acme").audit_marks)
    _fill(state, 1)
    again, rolled_back = audit_verify.watch(log, "acme", after)
    assert rolled_back is not None
    assert not rolled_back.cut
    assert "was wiped" in rolled_back.message
    assert again is not None
    assert again.seq == 1


def test_a_recorded_rollback_is_a_break(state: StateStore) -> None:
    _fill(state, 2)
    _log(state).append(
        AuditEvent(
            type=AuditEventType.AUDIT_ROLLED_BACK,
            tenant="acme",
            reason="the maintenance leader found the chain cut back",
        )
    )
    report = _verify(state)
    assert report.checked == 3
    assert "the maintenance leader found the chain cut back" in report.reason


def test_a_writer_logs_a_counter_that_went_back_and_not_replies_read_out_of_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sealer = AuditSealer(KEY)

    def wrote(entry_id: str, seq: int) -> None:
        sealer.wrote("acme", [[entry_id, ["seq", str(seq), "ts", "1", "type", "admitted"]]])

    with caplog.at_level("ERROR", logger="governance.audit"):
        wrote("10-0", 1)
        wrote("12-0", 3)
        wrote("11-0", 2)  # a reply read late, by another thread: fine
        assert not caplog.records
        wrote("13-0", 2)  # written after seq 3, numbered 2: the counter went back
    (record,) = caplog.records
    assert "wrote seq 3 (entry 12-0), then was given seq 2 (entry 13-0)" in record.getMessage()


def test_tail_marks_entries_without_a_valid_seal(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 2)
    forged = redis_client.xadd(
        STREAM, {b"seq": b"3", b"type": b"approved", b"tenant": b"acme", b"reviewer": b"alice"}
    )
    redis_client.hincrby(TenantKeys("acme").meta, "audit_seq", 1)
    log = _log(state)
    tail = log.tail(["acme"], 10)
    assert audit_verify.seal_states(log, KEY, tail, unsealed_after_ms=60_000)[forged.decode()] == (
        audit_verify.PENDING
    )
    time.sleep(0.01)
    states = audit_verify.seal_states(log, KEY, tail, unsealed_after_ms=5)
    assert sorted(states.items()) == sorted(
        (e.id, "unsealed" if e.id == forged.decode() else "sealed") for e in tail
    )
    sealed = next(e.id for e in tail if e.id != forged.decode())
    assert audit_verify.seal_states(log, b"other", tail, unsealed_after_ms=5)[sealed] == (
        audit_verify.ALTERED
    )


def test_a_counter_that_is_not_a_number_is_named(
    state: StateStore, redis_client: redis.Redis
) -> None:
    _fill(state, 2)
    redis_client.hset(TenantKeys("acme").meta, "audit_seq", "many")
    report = _verify(state)
    assert [b.entry for b in report.breaks] == ["(counter)"]
    assert "the chain's counter is not a number" in report.reason
    assert report.checked == 2
