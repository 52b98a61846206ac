"""What Flower may show of a call: secret-named keys' values become ``***``, at any depth."""

from __future__ import annotations

import pytest

from governance.integration.events import call_fields
from governance.integration.redaction import is_secret_key, redact


@pytest.mark.parametrize(
    "key",
    ["password", "DB_PASSWD", "access_token", "client_secret", "X-Api-Key", "apiKey", "api_key",
     "Authorization", "auth_header", "privateKey", "credentials", "session_cookie", "token"],
)  # fmt: skip
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["max_tokens", "tokens", "author", "path", "command", "headers", "passage", "keys"]
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_walks_nested_calls_and_leaves_the_rest() -> None:
    call = {
        "url": "https://api.example.com",
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "items": [{"password": "p", "name": "n"}, ("x", {"token": "t"})],
        "max_tokens": 50,
    }
    assert redact(call) == {
        "url": "https://api.example.com",
        "headers": {"Authorization": "***", "Accept": "json"},
        "items": [{"password": "***", "name": "n"}, ("x", {"token": "***"})],
        "max_tokens": 50,
    }
    assert call["headers"]["Authorization"] == "Bearer abc"  # the call itself is untouched
    assert call_fields(["a"], {"api_key": "k"}) == {"args": "['a']", "kwargs": "{'api_key': '***'}"}
