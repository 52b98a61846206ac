"""Redaction: secret-named argument values never leave the layer for a display.

A call's arguments are shown in Flower, in ``govctl``, in the result backend and in audit
details; a value whose key names a secret (``api_token``, ``password``, ``Authorization``, ...)
is shown as ``***`` there. The ledger and the held store keep the real value: it is what runs.
"""

from __future__ import annotations

import itertools
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
