"""Anchors: the audit chains' checkpoints, signed and kept outside Redis.

Whoever can write the state Redis can cut a chain's tail, reset its counter and put an older
checkpoint back, or wipe a chain whole: Redis then holds a shorter chain that is whole in
itself. An anchor is evidence Redis does not hold: every time the maintenance leader signs a
checkpoint, it also appends it, signed with an Ed25519 key only the workers hold, to an
append-only file (by default on its own host; a path shared by the hosts, or one file per host,
all given to ``govctl audit verify --anchors``). Verification then finds every anchored entry in
the chain, the same: a chain that ends before one, or holds another entry at its place, was
rolled back; a chain anchored but gone was wiped.

**The format** is a C2SP signed note (https://c2sp.org/signed-note). A note is a text body, each
line ending in ``\\n``; then an empty line; then one or more signature lines::

    governance.audit.anchor/v1
    chain acme
    seq 60
    id 1700000000000-0
    head 3f2a9c0d5e...          (the seal MAC of that entry: 40 hex digits)
    key 9c1e44a0b2c3d4e5        (the audit key's id, see ``audit_seal.key_id``)
    time 1700000000123          (when the leader signed it, epoch ms)

    \u2014 governance-audit-anchor AbCd...==

A signature line is ``\u2014`` (U+2014 EM DASH), a space, the key's name, a space, and the
base64 of the 4-byte key hash followed by the 64-byte Ed25519 signature of the body's bytes.
The key hash is the first 4 bytes of SHA-256(name || ``\\n`` || 0x01 || the 32-byte public
key); 0x01 names Ed25519. A verifier ignores signature lines of keys it does not know, and
accepts a note with at least one valid signature of its key. The body says: the chain, the
sequence number and stream id of the entry the checkpoint ends at, that entry's seal MAC (which
covers the chain, the id and every field), the id of the audit key the MAC is made with, and
the time.

**The file** holds notes one after another, each followed by one more empty line (so a file is
paragraphs that alternate: a body, its signatures). The leader appends each round's notes with
one ``write`` under an exclusive ``flock`` and ``fsync``\\s it; a write torn by a crash is closed
by the next append (a fragment, reported as unreadable, never merged with the next note).

**The keys** are the ones ``govctl reviewers keygen`` makes: the private key a PEM file
(``GOVERNANCE_AUDIT_ANCHOR_KEY_FILE``, for the workers), the public key its ``ed25519:<base64>``
text (``GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY``, for whoever verifies). A public key in the note
verifier format (``<name>+<hash hex>+<base64(0x01 || key)>``) is accepted too.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from governance.policy.signing import load_private_key, parse_public_key

#: The first line of every anchor's body.
ORIGIN = "governance.audit.anchor/v1"
#: The name the anchor key signs under (a note's signature line names its key).
KEY_NAME = "governance-audit-anchor"
#: Signature lines start with this (U+2014 EM DASH and a space).
SIGNATURE_START = "\u2014 "
_ED25519 = b"\x01"
_FIELDS = ("chain", "seq", "id", "head", "key", "time")


class AnchorKeyError(ValueError):
    """An anchor key that cannot be read or parsed (the message says why)."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_hash(name: str, public: Ed25519PublicKey) -> bytes:
    """The 4 bytes that name a key in a signature line."""
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + _raw(public)).digest()[:4]


@dataclass(frozen=True)
class AnchorVerifier:
    """A public anchor key: checks notes."""

    public: Ed25519PublicKey
    name: str = KEY_NAME

    @classmethod
    def from_text(cls, text: str) -> AnchorVerifier:
        """``ed25519:<base64>`` (as ``govctl reviewers keygen`` prints it), or a note verifier
        key ``<name>+<hash hex>+<base64(0x01 || key)>``."""
        text = text.strip()
        if text.count("+") >= 2 and not text.startswith("ed25519:"):
            name, hash_hex, encoded = text.split("+", 2)  # base64 may hold "+" too
            try:
                raw = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise AnchorKeyError("the anchor public key is not valid base64") from None
            if len(raw) != 33 or raw[:1] != _ED25519:
                raise AnchorKeyError("the anchor public key is not an Ed25519 verifier key")
            verifier = cls(Ed25519PublicKey.from_public_bytes(raw[1:]), name)
            if key_hash(name, verifier.public).hex() != hash_hex.lower():
                raise AnchorKeyError("the anchor public key's hash does not match its key")
            return verifier
        try:
            return cls(parse_public_key(text))
        except ValueError as exc:
            raise AnchorKeyError(f"the anchor public key: {exc}") from None

    @property
    def text(self) -> str:
        """The note verifier key: ``<name>+<hash hex>+<base64(0x01 || key)>``."""
        encoded = base64.b64encode(_ED25519 + _raw(self.public)).decode()
        return f"{self.name}+{key_hash(self.name, self.public).hex()}+{encoded}"

    def open(self, note: str) -> str:
        """The body of ``note`` if one of its signatures is this key's; ValueError if not."""
        body, sep, signatures = note.partition("\n\n")
        if not sep or not signatures.endswith("\n"):
            raise ValueError("not a signed note (no empty line before its signatures)")
        body += "\n"
        wanted = key_hash(self.name, self.public)
        for line in signatures[:-1].split("\n"):
            if not line.startswith(SIGNATURE_START):
                raise ValueError("a signature line does not start with an em dash")
            name, _, encoded = line[len(SIGNATURE_START) :].partition(" ")
            if name != self.name:
                continue
            try:
                blob = base64.b64decode(encoded, validate=True)
            except ValueError:
                continue
            if len(blob) != 68 or blob[:4] != wanted:
                continue
            try:
                self.public.verify(blob[4:], body.encode())
            except InvalidSignature:
                continue
            return body
        raise ValueError("no signature of the anchor key verifies")


@dataclass(frozen=True)
class AnchorSigner:
    """The private anchor key: signs notes."""

    private: Ed25519PrivateKey
    name: str = KEY_NAME

    @classmethod
    def from_file(cls, path: Path) -> AnchorSigner:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise AnchorKeyError(f"cannot read the anchor key {path}: {exc.strerror}") from None
        try:
            return cls(load_private_key(pem))
        except ValueError as exc:
            raise AnchorKeyError(f"the anchor key {path}: {exc}") from None

    @property
    def verifier(self) -> AnchorVerifier:
        return AnchorVerifier(self.private.public_key(), self.name)

    def sign(self, body: str) -> str:
        """The signed note of ``body`` (lines ending in ``\\n``)."""
        if not body.endswith("\n") or "\n\n" in body:
            raise ValueError("a note's body is non-empty lines, each ending in a newline")
        signature = self.private.sign(body.encode())
        blob = key_hash(self.name, self.private.public_key()) + signature
        return f"{body}\n{SIGNATURE_START}{self.name} {base64.b64encode(blob).decode()}\n"


@dataclass(frozen=True)
class AnchorRecord:
    """One anchored checkpoint: ``chain`` ended at ``seq`` (entry ``id``, whose seal MAC is
    ``head``, made with the audit key of id ``key``) at ``time_ms``."""

    chain: str
    seq: int
    id: str
    head: str
    key: str
    time_ms: int
    #: Where it was read from ("file:note number"), for messages; empty when made.
    source: str = ""

    def body(self) -> str:
        for value in (self.chain, self.id, self.head, self.key):
            if not value or any(c.isspace() for c in value):
                raise ValueError(f"an anchor field may not be empty or hold spaces: {value!r}")
        return (
            f"{ORIGIN}\nchain {self.chain}\nseq {self.seq}\nid {self.id}\nhead {self.head}\n"
            f"key {self.key}\ntime {self.time_ms}\n"
        )

    @classmethod
    def parse(cls, body: str, source: str = "") -> AnchorRecord:
        lines = body.rstrip("\n").split("\n")
        if lines[0] != ORIGIN:
            raise ValueError(f"not an audit anchor (its first line is not {ORIGIN!r})")
        values: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(" ")
            values[name] = value
        missing = [f for f in _FIELDS if not values.get(f)]
        if missing:
            raise ValueError(f"an audit anchor without {', '.join(missing)}")
        try:
            return cls(
                chain=values["chain"],
                seq=int(values["seq"]),
                id=values["id"],
                head=values["head"],
                key=values["key"],
                time_ms=int(values["time"]),
                source=source,
            )
        except ValueError:
            raise ValueError("an audit anchor whose seq or time is not a number") from None


def split_notes(text: str) -> list[tuple[int, str | None]]:
    """The notes of an anchor file, numbered from 1: (number, note), or (number, None) for a
    fragment that is not a note (a torn write)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip("\n")]
    found: list[tuple[int, str | None]] = []
    i = 0
    while i < len(paragraphs):
        body = paragraphs[i].strip("\n")
        following = paragraphs[i + 1].strip("\n") if i + 1 < len(paragraphs) else ""
        is_signatures = bool(following) and all(
            line.startswith(SIGNATURE_START) for line in following.split("\n")
        )
        if body.startswith(SIGNATURE_START) or not is_signatures:
            found.append((len(found) + 1, None))
            i += 1
            continue
        found.append((len(found) + 1, f"{body}\n\n{following}\n"))
        i += 2
    return found


@dataclass
class AnchorSet:
    """The anchors read from files: the records that verify, and what could not be used."""

    files: list[str] = field(default_factory=list)
    records: list[AnchorRecord] = field(default_factory=list)
    #: Notes whose signature does not verify under the key, or that are not anchors.
    unverified: list[str] = field(default_factory=list)
    #: Fragments that are not notes (a write torn by a crash).
    torn: list[str] = field(default_factory=list)

    def of(self, chain: str) -> list[AnchorRecord]:
        return [r for r in self.records if r.chain == chain]

    @property
    def chains(self) -> list[str]:
        return sorted({r.chain for r in self.records})

    def newest(self) -> dict[str, AnchorRecord]:
        """Each chain's newest anchor (the last signed; after a rollback, lower than others)."""
        newest: dict[str, AnchorRecord] = {}
        for record in self.records:
            known = newest.get(record.chain)
            if known is None or record.time_ms >= known.time_ms:
                newest[record.chain] = record
        return newest


def read_anchors(paths: Iterable[Path], verifier: AnchorVerifier) -> AnchorSet:
    """Every anchor of ``paths`` that verifies under ``verifier``. A file that cannot be read
    raises OSError (a file given is meant to be there)."""
    found = AnchorSet()
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        found.files.append(str(path))
        for number, note in split_notes(text):
            where = f"{path}:{number}"
            if note is None:
                found.torn.append(where)
                continue
            try:
                found.records.append(AnchorRecord.parse(verifier.open(note), where))
            except ValueError as exc:
                found.unverified.append(f"{where}: {exc}")
    return found


def parse_paths(text: str) -> list[Path]:
    """Anchor files from a setting: one path, or several separated by ``:`` (like ``PATH``)."""
    return [Path(p) for p in text.split(os.pathsep) if p.strip()]


def append_anchors(path: Path, signer: AnchorSigner, records: Sequence[AnchorRecord]) -> None:
    """Append the signed notes of ``records`` to ``path`` (created, with its folder, if need
    be): one write under an exclusive lock, then fsync. A torn fragment left at the end of
    the file by a crash is closed first, so it never runs into the new notes."""
    if not records:
        return
    data = "".join(signer.sign(r.body()) + "\n" for r in records).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            tail = os.pread(fd, 2, max(0, size - 2))
            if tail != b"\n\n":
                data = (b"\n\n" if not tail.endswith(b"\n") else b"\n") + data
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
