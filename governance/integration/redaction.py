"""Redaction: secret-named argument values never leave the layer for a display.

A call's arguments are shown in Flower, in ``govctl``, in the result backend and in audit
details; a value whose key names a secret (``api_token``, ``password``, ``Authorization``, ...)
is shown as ``***`` there. The ledger and the held store keep the real value: it is what runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any

#: Words of a key that make its value a secret: ``password``, ``DB_PASSWD``, ``access_token``,
#: ``client_secret``, ``X-Api-Key``, ``apiKey``, ``Authorization``, ... (``max_tokens`` is not).
SECRET_WORDS = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "token", "secret", "secrets", "apikey",
        "authorization", "auth", "credential", "credentials", "cookie", "privatekey",
    }
)  # fmt: skip
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret: one of its words (split at ``_``, ``-``, ``.``,
    spaces and camelCase), or two adjacent ones (``api key``, ``private key``), is a secret
    word."""
    words = [w.lower() for w in _WORD.findall(key)]
    pairs = [a + b for a, b in itertools.pairwise(words)]
    return any(w in SECRET_WORDS for w in (*words, *pairs))


def redact(value: Any) -> Any:
    """``value`` with every secret-named mapping key's value replaced by ``"***"``.

    Walks dicts, lists and tuples; keys are judged by :func:`is_secret_key`. Used wherever a
    call's arguments leave the governance state for a display (Flower).
    """
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def fingerprint(value: Any) -> str:
    """A short fingerprint of a secret value (the first 8 hex digits of the SHA-256 of its
    canonical JSON): two reviewers can tell whether they saw the same value, without seeing it.
    Short on purpose, so it identifies a value without helping much to guess it."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def masked(value: Any) -> str:
    """How a reviewer is shown a secret-named value: ``***`` with its fingerprint and length."""
    length = len(value) if isinstance(value, str) else len(json.dumps(value, default=str))
    return f"{REDACTED} (sha256:{fingerprint(value)}, {length} chars)"


def redact_for_review(value: Any) -> Any:
    """``value`` as a reviewer is shown it: like :func:`redact`, but each secret-named value
    is :func:`masked`, so a reviewer can judge that it is there, and whether it changed,
    without reading it (``govctl held show --reveal`` shows it, and is audited)."""
    if isinstance(value, dict):
        return {
            k: masked(v) if isinstance(k, str) and is_secret_key(k) else redact_for_review(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_for_review(v) for v in value)
    return value


def has_secrets(value: Any) -> bool:
    """Whether ``value`` holds a secret-named value anywhere."""
    return bool(redact(value) != value)
