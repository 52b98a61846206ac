"""Bearer tokens of the MCP server's HTTP transport: who a token is (tenant, agent, user).

A token file is JSON, ``{"version": 1, "tokens": {<sha256 of the token, hex>: {"tenant": ...,
"agent": ..., "user": ... | null, "created_ms": ..., "label": ...}}}``. Only the hash of a
token is stored: ``govctl mcp token add`` prints the token once, and nobody can read it back.
A request's token is hashed, and its hash compared with every stored hash in constant time
(:func:`hmac.compare_digest`, no early exit), so neither the comparison nor the lookup tells
how much of a guess was right. An unknown, malformed or missing token is refused.

The file is written with mode 0600, replaced atomically (a reader sees the old file or the new
one), and read again by the server when it changes, so a token added or removed takes effect
without a restart. Pure Python: no Celery, no Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governance.policy.context import validate_identifier

#: Every token starts with this, so a leaked one is recognisable (secret scanners, logs).
TOKEN_PREFIX = "gmcp_"
#: How many hex digits of a token's hash name it in listings and ``token remove``.
ID_LENGTH = 12
FILE_VERSION = 1


class TokenFileError(ValueError):
    """The token file cannot be read or is malformed (the message names the file)."""


@dataclass(frozen=True)
class TokenIdentity:
    """Who a token is: the governance context it binds a connection to (the run aside)."""

    tenant: str
    agent: str
    user: str | None = None
    #: The first hex digits of the token's hash: names the token without revealing it.
    token_id: str = ""
    label: str = ""
    created_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "tenant": self.tenant,
            "agent": self.agent,
            "user": self.user,
            "label": self.label,
            "created_ms": self.created_ms,
        }


def token_hash(token: str) -> str:
    """The stored form of a token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, with the recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _identity(digest: str, raw: Any, source: Path) -> TokenIdentity:
    if not isinstance(raw, Mapping):
        raise TokenFileError(f"{source}: tokens.{digest[:ID_LENGTH]}: not an object")
    try:
        tenant = validate_identifier(str(raw["tenant"]))
        agent = validate_identifier(str(raw["agent"]))
        user = raw.get("user")
        if user is not None:
            user = validate_identifier(str(user))
    except KeyError as exc:
        raise TokenFileError(
            f"{source}: tokens.{digest[:ID_LENGTH]}: missing {exc.args[0]!r}"
        ) from None
    except ValueError as exc:
        raise TokenFileError(f"{source}: tokens.{digest[:ID_LENGTH]}: {exc}") from None
    return TokenIdentity(
        tenant=tenant,
        agent=agent,
        user=user,
        token_id=digest[:ID_LENGTH],
        label=str(raw.get("label") or ""),
        created_ms=int(raw.get("created_ms") or 0),
    )


def _is_digest(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class TokenFile:
    """The token file at ``path``: add, list, remove, and look a token up (see module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[int, int, int], dict[str, TokenIdentity]] | None = None

    # -- reading -------------------------------------------------------------------------------

    def _read(self) -> dict[str, TokenIdentity]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text) if text.strip() else {"tokens": {}}
        except ValueError as exc:
            raise TokenFileError(f"{self.path}: not JSON: {exc}") from None
        tokens = data.get("tokens") if isinstance(data, Mapping) else None
        if not isinstance(tokens, Mapping):
            raise TokenFileError(f"{self.path}: expected an object with a 'tokens' object")
        found = {}
        for digest, raw in tokens.items():
            if not isinstance(digest, str) or not _is_digest(digest):
                raise TokenFileError(
                    f"{self.path}: {digest!r} is not a token's sha256 (64 hex digits)"
                )
            found[digest] = _identity(digest, raw, self.path)
        return found

    def entries(self) -> dict[str, TokenIdentity]:
        """Every token's hash and identity, read again when the file changed."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        with self._lock:
            if self._loaded is None or self._loaded[0] != stamp:
                self._loaded = (stamp, self._read())
            return self._loaded[1]

    def lookup(self, token: str | None) -> TokenIdentity | None:
        """The identity of ``token``, or None (unknown, empty, missing).

        The token's hash is compared with every stored hash, each in constant time, and the
        loop never stops early: how long this takes depends on the number of tokens only.
        """
        if not token:
            return None
        wanted = token_hash(token).encode()
        found: TokenIdentity | None = None
        for digest, identity in self.entries().items():
            if hmac.compare_digest(wanted, digest.encode()):
                found = identity
        return found

    # -- writing -------------------------------------------------------------------------------

    def add(
        self, tenant: str, agent: str, user: str | None = None, label: str = ""
    ) -> tuple[str, TokenIdentity]:
        """A new token for ``tenant``/``agent`` (acting for ``user``): returns the token, which
        is not stored anywhere, and its identity."""
        validate_identifier(tenant)
        validate_identifier(agent)
        if user is not None:
            validate_identifier(user)
        token = new_token()
        digest = token_hash(token)
        record = {
            "tenant": tenant,
            "agent": agent,
            "user": user,
            "label": label,
            "created_ms": int(time.time() * 1000),
        }
        with self._lock:
            data = self._raw()
            data["tokens"][digest] = record
            self._write(data)
            self._loaded = None
        return token, _identity(digest, record, self.path)

    def remove(self, token_id: str) -> TokenIdentity:
        """Remove the token whose id (the first hex digits of its hash, at least 8) is
        ``token_id``; KeyError when none or several match."""
        prefix = token_id.strip().lower()
        with self._lock:
            data = self._raw()
            matches = [d for d in data["tokens"] if len(prefix) >= 8 and d.startswith(prefix)]
            if len(matches) != 1:
                raise KeyError(
                    f"no token with id {token_id!r} in {self.path}"
                    if not matches
                    else f"token id {token_id!r} is ambiguous in {self.path}: give more digits"
                )
            removed = _identity(matches[0], data["tokens"].pop(matches[0]), self.path)
            self._write(data)
            self._loaded = None
        return removed

    def _raw(self) -> dict[str, Any]:
        self._read()  # refuse to rewrite a file that is not a valid token file
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": FILE_VERSION, "tokens": {}}
        data = json.loads(text) if text.strip() else {}
        data.setdefault("tokens", {})
        data["version"] = FILE_VERSION
        return dict(data)

    def _write(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tokens-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
