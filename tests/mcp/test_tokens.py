"""The token file: only hashes are stored, a token is printed once, lookups compare every hash
in constant time, an unknown, empty or removed token is nobody."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from governance.mcp import tokens as tokens_module
from governance.mcp.tokens import TOKEN_PREFIX, TokenFile, TokenFileError, token_hash


def test_a_new_token_is_stored_as_its_hash_only(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "tokens.json")
    token, identity = file.add("acme", "planner", "carol", label="laptop")
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > 40
    raw = (tmp_path / "tokens.json").read_text()
    assert token not in raw
    data = json.loads(raw)
    assert list(data["tokens"]) == [token_hash(token)]
    assert data["tokens"][token_hash(token)]["tenant"] == "acme"
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert identity.token_id == token_hash(token)[:12]
    found = file.lookup(token)
    assert found is not None
    assert (found.tenant, found.agent, found.user, found.label) == (
        "acme",
        "planner",
        "carol",
        "laptop",
    )


def test_unknown_empty_and_missing_tokens_are_nobody(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "tokens.json")
    assert file.lookup("anything") is None  # no file yet: nobody
    token, _ = file.add("acme", "planner")
    for guess in ("", None, token[:-1], token + "x", token_hash(token), TOKEN_PREFIX):
        assert file.lookup(guess) is None


def test_every_stored_hash_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = TokenFile(tmp_path / "tokens.json")
    made = [file.add("acme", f"agent-{i}")[0] for i in range(5)]
    compared: list[tuple[bytes, bytes]] = []
    real = tokens_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    found = file.lookup(made[0])
    assert found is not None
    assert found.agent == "agent-0"
    assert len(compared) == 5  # no early exit on the match
    assert {a for a, _ in compared} == {token_hash(made[0]).encode()}


def test_a_removed_token_is_refused_at_once_and_another_process_sees_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.json"
    server_side = TokenFile(path)
    keep, _ = TokenFile(path).add("acme", "a")
    assert server_side.lookup(keep) is not None
    gone, identity = TokenFile(path).add("beta", "b")
    assert server_side.lookup(gone) is not None  # read again: the file changed
    TokenFile(path).remove(identity.token_id[:8])
    assert server_side.lookup(gone) is None
    assert server_side.lookup(keep) is not None
    with pytest.raises(KeyError):
        TokenFile(path).remove(identity.token_id)


def test_a_malformed_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    for content, problem in (
        ("{not json", "not JSON"),
        ('{"tokens": {"abc": {"tenant": "t", "agent": "a"}}}', "64 hex digits"),
        ('{"tokens": {"' + "a" * 64 + '": {"tenant": "t"}}}', "missing 'agent'"),
        ('{"tokens": {"' + "a" * 64 + '": {"tenant": "t t", "agent": "a"}}}', "may only contain"),
    ):
        path.write_text(content)
        with pytest.raises(TokenFileError, match=problem) as raised:
            TokenFile(path).lookup("x")
        assert str(path) in str(raised.value)
        with pytest.raises(TokenFileError):
            TokenFile(path).add("acme", "a")  # never rewrites a file it cannot read


def test_identities_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="may only contain"):
        TokenFile(tmp_path / "t.json").add("acme", "bad agent")
