"""Anchors: C2SP signed notes of the audit checkpoints, in append-only files outside Redis."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization

from governance.policy.signing import new_private_key, private_key_pem, public_key_text
from governance.store import AuditEvent, AuditEventType, AuditLog, StateStore, audit_verify
from governance.store.audit_anchor import (
    KEY_NAME,
    AnchorKeyError,
    AnchorRecord,
    AnchorSigner,
    AnchorVerifier,
    append_anchors,
    parse_paths,
    read_anchors,
    split_notes,
)
from governance.store.audit_seal import AuditSealer, key_id
from governance.store.keys import TenantKeys

KEY = b"test-audit-key"


def _signer() -> AnchorSigner:
    return AnchorSigner(new_private_key())


def _record(seq: int = 7, chain: str = "acme") -> AnchorRecord:
    return AnchorRecord(
        chain=chain,
        seq=seq,
        id=f"1700000000000-{seq}",
        head="ab" * 20,
        key=key_id(KEY),
        time_ms=1_700_000_000_123,
    )


def test_a_note_is_the_body_a_blank_line_and_a_c2sp_signature_line() -> None:
    signer = _signer()
    body = _record().body()
    note = signer.sign(body)
    assert body == (
        "governance.audit.anchor/v1\nchain acme\nseq 7\nid 1700000000000-7\n"
        f"head {'ab' * 20}\nkey {key_id(KEY)}\ntime 1700000000123\n"
    )
    text_body, blank, signature = note.partition("\n\n")
    assert text_body + "\n" == body
    assert blank
    assert signature.startswith(f"\u2014 {KEY_NAME} ")
    assert signature.endswith("\n")
    assert signature.count("\n") == 1
    # The signature line: base64 of the 4-byte key hash, SHA-256(name || "\n" || 0x01 || key),
    # and the Ed25519 signature of the body's bytes.
    blob = base64.b64decode(signature.split(" ")[2])
    public = signer.private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == hashlib.sha256(KEY_NAME.encode() + b"\n\x01" + raw).digest()[:4]
    public.verify(blob[4:], body.encode())  # raises if it is not the body's signature
    assert signer.verifier.open(note) == body
    assert AnchorRecord.parse(body) == _record()


def test_a_note_opens_only_under_its_key_and_unedited() -> None:
    signer, other = _signer(), _signer()
    note = signer.sign(_record().body())
    with pytest.raises(ValueError, match="no signature of the anchor key verifies"):
        other.verifier.open(note)
    with pytest.raises(ValueError, match="no signature"):
        signer.verifier.open(note.replace("seq 7", "seq 9"))
    # A signature line of a key the verifier does not know is ignored (C2SP): the note still
    # opens with its own.
    cosigned = note + other.sign(_record().body()).partition("\n\n")[2]
    assert signer.verifier.open(cosigned) == _record().body()
    with pytest.raises(ValueError, match="not a signed note"):
        signer.verifier.open(_record().body())


def test_the_public_key_reads_as_govctl_keygen_prints_it_or_as_a_note_verifier_key() -> None:
    signer = _signer()
    public = public_key_text(signer.private.public_key())
    assert AnchorVerifier.from_text(public) == signer.verifier
    vkey = signer.verifier.text
    name, hash_hex, _ = vkey.split("+", 2)
    assert name == KEY_NAME
    assert len(hash_hex) == 8
    assert AnchorVerifier.from_text(vkey) == signer.verifier
    with pytest.raises(AnchorKeyError, match="hash does not match"):
        AnchorVerifier.from_text(vkey.replace(hash_hex, "00000000"))
    with pytest.raises(AnchorKeyError, match="ed25519:"):
        AnchorVerifier.from_text("not a key")


def test_the_private_key_is_a_pem_file(tmp_path: Path) -> None:
    key = new_private_key()
    path = tmp_path / "anchor.key"
    path.write_bytes(private_key_pem(key))
    assert AnchorSigner.from_file(path).verifier == AnchorSigner(key).verifier
    with pytest.raises(AnchorKeyError, match="cannot read the anchor key"):
        AnchorSigner.from_file(tmp_path / "missing.key")
    path.write_text("garbage")
    with pytest.raises(AnchorKeyError, match="not a PEM private key"):
        AnchorSigner.from_file(path)


def test_files_are_appended_and_read_back_torn_writes_apart(tmp_path: Path) -> None:
    signer = _signer()
    first = tmp_path / "a" / "anchors.txt"
    append_anchors(first, signer, [_record(1), _record(2, "beta")])
    append_anchors(first, signer, [_record(3)])
    assert split_notes(first.read_text())[-1][1] is not None
    # A crash mid-write leaves a fragment; the next append closes it first.
    with first.open("a") as handle:
        handle.write("governance.audit.anchor/v1\nchain acme\nseq")
    append_anchors(first, signer, [_record(4)])
    # Another key's note in the same file is not counted.
    append_anchors(first, _signer(), [_record(99)])
    second = tmp_path / "b.txt"
    append_anchors(second, signer, [_record(5)])
    found = read_anchors(parse_paths(f"{first}:{second}"), signer.verifier)
    assert [(r.chain, r.seq) for r in found.records] == [
        ("acme", 1),
        ("beta", 2),
        ("acme", 3),
        ("acme", 4),
        ("acme", 5),
    ]
    assert found.records[0].source == f"{first}:1"
    assert found.torn == [f"{first}:4"]
    assert len(found.unverified) == 1
    assert "no signature of the anchor key" in found.unverified[0]
    assert found.chains == ["acme", "beta"]
    assert found.newest()["acme"].seq == 5
    assert oct(first.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(OSError, match="missing"):
        read_anchors([tmp_path / "missing"], signer.verifier)


def _fill(log: AuditLog, n: int, tenant: str = "acme") -> None:
    for i in range(n):
        log.append(AuditEvent(type=AuditEventType.ADMITTED, tenant=tenant, task_id=f"t{i}"))


def _anchor(log: AuditLog, chain: str = "acme") -> AnchorRecord:
    assert audit_verify.checkpoint(log, KEY, chain) > 0
    record = audit_verify.anchor_of(log, KEY, chain)
    assert record is not None
    return record


def _cut_to(client: redis.Redis, seq: int, chain: str = "acme") -> None:
    """What a rollback is: every stream entry after entry ``seq`` removed (seals too), the
    counter set back to ``seq``."""
    stream = TenantKeys(chain).audit
    rows = client.xrange(stream)
    at = next(i for i, (_, f) in enumerate(rows) if f.get(b"seq") == str(seq).encode())
    for entry_id, _fields in rows[at + 1 :]:
        client.xdel(stream, entry_id)
    client.hset(TenantKeys(chain).meta, "audit_seq", seq)


def test_verify_with_anchors_names_a_rollback_a_rewrite_and_a_wipe(
    state: StateStore, redis_client: redis.Redis
) -> None:
    log = AuditLog(state, AuditSealer(KEY))
    _fill(log, 4)
    assert audit_verify.checkpoint(log, KEY, "acme") == 4
    old_checkpoint = redis_client.hget(TenantKeys("acme").audit_marks, "checkpoint")
    _fill(log, 3)
    anchors = [_anchor(log)]
    assert anchors[0].seq == 7
    assert audit_verify.verify(log, KEY, "acme", anchors=anchors).ok
    # Rolled back: the tail cut to seq 4, the counter reset, the old checkpoint put back. Redis
    # alone shows a whole chain; the anchor does not.
    _cut_to(redis_client, 4)
    redis_client.hset(TenantKeys("acme").audit_marks, "checkpoint", old_checkpoint)
    assert audit_verify.verify(log, KEY, "acme").ok
    report = audit_verify.verify(log, KEY, "acme", anchors=anchors)
    assert report.anchored == 1
    assert not report.ok
    assert "seq 7 (entry" in report.reason
    assert "the chain ends at seq 4: it was rolled back" in report.reason
    # ... and written again past the anchored seq: the entry there is another one.
    _fill(log, 5)
    report = audit_verify.verify(log, KEY, "acme", anchors=anchors)
    assert "the entry at seq 7 is not the one anchored" in report.reason
    # Wiped whole: anchored, but gone.
    redis_client.delete(*(getattr(TenantKeys("acme"), k) for k in ("audit", "meta", "audit_marks")))
    assert audit_verify.verify(log, KEY, "acme").ok
    report = audit_verify.verify(log, KEY, "acme", anchors=anchors)
    assert "was anchored up to seq 7" in report.reason
    assert "it is gone: it was wiped" in report.reason


def test_anchors_below_a_signed_trim_and_of_another_key_are_not_compared(
    state: StateStore, redis_client: redis.Redis
) -> None:
    log = AuditLog(state, AuditSealer(KEY))
    _fill(log, 3)
    early = _anchor(log)
    time.sleep(0.05)
    _fill(log, 2)
    late = _anchor(log)
    first_kept = [i for i, f in redis_client.xrange(TenantKeys("acme").audit) if b"seq" in f][3]
    cutoff_age_ms = int(time.time() * 1000) - int(first_kept.split(b"-")[0]) + 1
    assert audit_verify.trim(log, KEY, "acme", cutoff_age_ms) > 0
    other = AnchorRecord("acme", 5, late.id, "00" * 20, "another-key-id", late.time_ms)
    report = audit_verify.verify(log, KEY, "acme", anchors=[early, late, other])
    assert report.ok, report.breaks
    assert report.anchored == 2
    assert report.anchor_keys == {key_id(KEY), "another-key-id"}
