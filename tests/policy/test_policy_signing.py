"""Signed reviewer decisions: what verifies, and every way a release is refused (no I/O)."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from governance.policy.signing import (
    DecisionPayload,
    call_hash,
    check_grant,
    check_release,
    grant_until_ms,
    load_private_key,
    new_nonce,
    new_private_key,
    parse_public_key,
    private_key_pem,
    public_key_text,
    shared_keys,
    sign,
    verified,
)

NOW = 1_800_000_000_000
CONTEXT = {"tenant": "acme", "agent": "bot", "run": "r1", "user": "dana", "trace_id": "t1"}
CALL = call_hash("tools.shell", [], {"command": ["ls"]}, CONTEXT)
KEYS = {name: new_private_key() for name in ("alice", "bob", "dana", "mallory")}
REVIEWERS = {name: KEYS[name].public_key() for name in ("alice", "bob", "dana")}


def decision(
    reviewer: str,
    *,
    signer: str | None = None,
    verdict: str = "approve",
    task_id: str = "task-1",
    call: str = CALL,
    at_ms: int = NOW,
    grant_s: int | None = None,
    tenant: str = "acme",
    requester: str = "dana",
) -> dict[str, Any]:
    payload = DecisionPayload(
        task_id=task_id,
        tenant=tenant,
        agent="bot",
        action="shell",
        call=call,
        verdict="approve" if verdict == "approve" else "reject",
        reviewer=reviewer,
        reason="ok",
        grant_s=grant_s,
        policy="v1",
        nonce=new_nonce(),
        at_ms=at_ms,
        requester=requester,
    )
    return sign(KEYS[signer or reviewer], payload)


def release(decisions: list[dict[str, Any]], quorum: int = 2, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "reviewers": REVIEWERS,
        "quorum": quorum,
        "allow_self_approval": False,
        "task_id": "task-1",
        "call": CALL,
        "requester": "dana",
        "now_ms": NOW + 1000,
        "valid_for": timedelta(hours=1),
    }
    return check_release(decisions, **{**options, **overrides})


def test_keys_round_trip_through_their_text_and_pem_forms() -> None:
    key = new_private_key()
    again = load_private_key(private_key_pem(key))
    text = public_key_text(key.public_key())
    assert text.startswith("ed25519:")
    assert public_key_text(parse_public_key(text)) == text == public_key_text(again.public_key())
    with pytest.raises(ValueError, match="32 bytes"):
        parse_public_key("ed25519:AAAA")
    with pytest.raises(ValueError, match="not a PEM private key"):
        load_private_key(b"nonsense")


def test_the_call_hash_covers_arguments_and_context() -> None:
    assert call_hash("tools.shell", [], {"command": ["ls", "-l"]}, CONTEXT) != CALL
    assert call_hash("tools.shell", [], {"command": ["ls"]}, {**CONTEXT, "user": "x"}) != CALL
    assert call_hash("tools.echo", [], {"command": ["ls"]}, CONTEXT) != CALL
    assert (
        call_hash("tools.shell", [], {"command": ["ls"]}, dict(reversed(CONTEXT.items()))) == CALL
    )


def test_a_quorum_of_distinct_listed_reviewers_releases() -> None:
    ok = release([decision("alice"), decision("bob")])
    assert ok.ok
    assert ok.reviewers == ("alice", "bob")


def test_the_same_reviewer_twice_counts_once() -> None:
    twice = release([decision("alice"), decision("alice")])
    assert not twice.ok
    assert "1 valid approval(s) of 2 required" in twice.reason


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (lambda: decision("bob", signer="mallory"), "does not verify"),
        (lambda: decision("mallory"), "'mallory' is not a listed reviewer"),
        (lambda: decision("bob", task_id="task-2"), "another call"),
        (lambda: decision("bob", call="0" * 64), "another call"),
        (lambda: decision("bob", verdict="reject"), "rejected it"),
        (lambda: decision("dana"), "requested it and may not approve it"),
        (lambda: decision("bob", at_ms=NOW - 2 * 3600 * 1000), "older than"),
    ],
)
def test_a_release_is_refused_for_each_bad_decision(bad: Any, why: str) -> None:
    refused = release([decision("alice"), bad()])
    assert not refused.ok
    assert why in refused.reason


def test_valid_for_counts_from_the_last_approval_of_the_quorum() -> None:
    hour = 3600 * 1000
    # alice approved 50 minutes before bob completed the quorum; bob signed 20 minutes ago.
    early, last = (
        decision("alice", at_ms=NOW - 70 * 60 * 1000),
        decision("bob", at_ms=NOW - hour // 3),
    )
    ok = release([early, last], collect_for=timedelta(hours=1))
    assert ok.ok, ok.reason
    # A signature older than the time a hold may take to collect its quorum, plus valid_for,
    # releases nothing however recent the others are.
    stale = decision("alice", at_ms=NOW - 3 * hour)
    refused = release([stale, last], collect_for=timedelta(hours=1))
    assert not refused.ok
    assert not refused.expired
    assert "older than 2:00:00" in refused.reason


def test_a_genuine_release_older_than_valid_for_is_expired_not_forged() -> None:
    old = [
        decision("alice", at_ms=NOW - 3 * 3600 * 1000),
        decision("bob", at_ms=NOW - 2 * 3600 * 1000),
    ]
    expired = release(old, collect_for=timedelta(hours=24))
    assert not expired.ok
    assert expired.expired
    assert expired.reviewers == ("alice", "bob")
    assert "older than approval.valid_for (1:00:00)" in expired.reason
    assert "by 'bob'" in expired.reason


def test_an_edited_payload_does_not_verify() -> None:
    signed = decision("bob")
    edited = copy.deepcopy(signed)
    edited["payload"]["call"] = "f" * 64
    assert verified(signed, REVIEWERS)[0] is not None
    payload, why = verified(edited, REVIEWERS)
    assert payload is None
    assert "does not verify" in why
    assert verified({"payload": {"v": 1}}, REVIEWERS)[1].startswith("a malformed decision")


def test_self_approval_when_the_tenant_allows_it() -> None:
    assert release([decision("dana")], quorum=1, allow_self_approval=True).ok
    assert not release([decision("dana")], quorum=1).ok


def test_a_grant_needs_every_approval_of_the_quorum_and_is_capped() -> None:
    payloads = [
        p for p, _ in (verified(d, REVIEWERS) for d in (
            decision("alice", grant_s=3600), decision("bob", grant_s=48 * 3600)
        )) if p
    ]  # fmt: skip
    assert grant_until_ms(payloads, timedelta(hours=24)) == NOW + 3600 * 1000
    assert grant_until_ms(payloads, timedelta(minutes=30)) == NOW + 1800 * 1000
    one_asked = [p for p, _ in (verified(d, REVIEWERS) for d in (
        decision("alice", grant_s=3600), decision("bob")
    )) if p]  # fmt: skip
    assert grant_until_ms(one_asked, timedelta(hours=24)) is None


def test_a_stored_grant_is_checked_against_the_signatures() -> None:
    approvals = [decision("alice", grant_s=3600), decision("bob", grant_s=3600)]
    grant = {"agent": "bot", "action": "shell", "requester": "dana", "decisions": approvals}
    common: dict[str, Any] = {
        "reviewers": REVIEWERS,
        "quorum": 2,
        "allow_self_approval": False,
        "max_grant": timedelta(hours=24),
        "action_names": ["shell", "process.exec"],
        "tenant": "acme",
    }
    assert check_grant(grant, agent="bot", now_ms=NOW + 1000, **common).ok
    assert not check_grant(grant, agent="other", now_ms=NOW + 1000, **common).ok
    expired = check_grant(grant, agent="bot", now_ms=NOW + 3601 * 1000, **common)
    assert (expired.ok, expired.reason) == (False, "the grant has expired")
    forged = {**grant, "decisions": approvals[:1]}
    assert "quorum" in check_grant(forged, agent="bot", now_ms=NOW, **common).reason


GRANT_RULES: dict[str, Any] = {
    "reviewers": REVIEWERS,
    "quorum": 2,
    "allow_self_approval": False,
    "max_grant": timedelta(hours=24),
    "action_names": ["shell"],
    "agent": "bot",
    "now_ms": NOW + 1000,
}


def test_a_grant_copied_into_another_tenant_lifts_nothing_there() -> None:
    """Attack 7: tenants sharing reviewer keys; tenant A's grant record copied into B's grants."""
    approvals = [decision("alice", grant_s=3600), decision("bob", grant_s=3600)]
    grant = {"agent": "bot", "action": "shell", "requester": "dana", "decisions": approvals}
    assert check_grant(grant, tenant="acme", **GRANT_RULES).ok
    copied = check_grant(grant, tenant="globex", **GRANT_RULES)
    assert not copied.ok
    assert "signed for tenant 'acme', not 'globex'" in copied.reason


def test_a_grant_whose_record_drops_the_requester_cannot_approve_its_own_request() -> None:
    """Attack 8: alice requested the call; she stores her own signed grant with an empty
    ``requester`` in the record. The rule reads the requester from the signed approvals."""
    own = [
        decision("alice", grant_s=3600, requester="alice"),
        decision("bob", grant_s=3600, requester="alice"),
    ]
    record = {"agent": "bot", "action": "shell", "requester": "", "decisions": own}
    verdict = check_grant(record, tenant="acme", **GRANT_RULES)
    assert not verdict.ok
    assert "'alice' requested it and may not approve it" in verdict.reason


def test_a_grant_whose_approvals_sign_no_requester_is_refused_unless_self_approval_is_allowed() -> (
    None
):
    unsigned = [
        decision("alice", grant_s=3600, requester=""),
        decision("bob", grant_s=3600, requester=""),
    ]
    record = {"agent": "bot", "action": "shell", "requester": "dana", "decisions": unsigned}
    refused = check_grant(record, tenant="acme", **GRANT_RULES)
    assert not refused.ok
    assert "do not sign who requested the call" in refused.reason
    allowed = {**GRANT_RULES, "allow_self_approval": True}
    assert check_grant(record, tenant="acme", **allowed).ok


def test_one_key_listed_under_two_names_counts_once_toward_a_quorum() -> None:
    """Attack 9: the same public key listed as alice and alias; quorum 2."""
    reviewers = {**REVIEWERS, "alias": KEYS["alice"].public_key()}
    twice = [decision("alice"), decision("alias", signer="alice")]
    verdict = release(twice, reviewers=reviewers)
    assert not verdict.ok
    assert "1 valid approval(s) of 2 required" in verdict.reason
    assert release([decision("alice"), decision("bob")], reviewers=reviewers).ok
    assert shared_keys(reviewers) == [["alias", "alice"]]
    assert shared_keys(REVIEWERS) == []


def test_a_release_signed_for_another_tenant_does_not_release() -> None:
    other = [decision("alice", tenant="globex"), decision("bob", tenant="globex")]
    verdict = release(other, tenant="acme")
    assert not verdict.ok
    assert "signed for tenant 'globex'" in verdict.reason


def test_a_grant_never_lifts_a_call_requested_by_a_reviewer_who_signed_it() -> None:
    """Attack 8, whatever the record or the payload says of the original requester: alice's
    approval never counts for alice's own request, so her grant does not lift her calls."""
    rules = {**GRANT_RULES, "quorum": 1}
    grant = {
        "agent": "bot",
        "action": "shell",
        "requester": "dana",
        "decisions": [decision("alice", grant_s=3600, requester="")],
    }
    assert check_grant(grant, tenant="acme", **rules).forged
    honest = {**grant, "decisions": [decision("alice", grant_s=3600, requester="dana")]}
    assert check_grant(honest, tenant="acme", requested_by="dana", **rules).ok
    own = check_grant(honest, tenant="acme", requested_by="alice", **rules)
    assert not own.ok
    assert "signed by 'alice', who requests this call" in own.reason
    assert not own.forged
