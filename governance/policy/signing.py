"""Signed reviewer decisions: what a reviewer signs, and the checks a worker makes before running.

A reviewer holds an Ed25519 private key; its public half is listed in the tenant's `reviewers`.
A decision (approve or reject) is signed over everything it decides: the task id, the hash of the
exact call (task name, arguments and context), the verdict, the reason, the grant asked for, the
policy version, a fresh nonce and the time. The worker, where the action would take effect,
releases an approval-tier call only with valid signatures of a quorum of distinct listed
reviewers, none of them the requester, each over this very call. Anyone who can write Redis or
the broker can copy or edit a decision but not sign one: a forged, replayed or misapplied release
is refused. Verification is computation, not I/O: this module stays in the pure policy layer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_PREFIX = "ed25519:"
SIGNATURE_VERSION = 1
Verdict = Literal["approve", "reject"]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: The longest a release may stay valid (``approval.valid_for`` plus the ``expiry`` its
#: signatures may take to collect): the ledger remembers an ended task at least this long
#: (``store.state.KeyTTL.task_s``), so a copied release finds the task ended, never fresh.
RELEASE_HORIZON = timedelta(days=7)


def call_hash(
    task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any], context: Mapping[str, Any]
) -> str:
    """The hash a decision is bound to: the exact call, its context included (who, which run,
    requested by whom). A copy with other arguments or another context has another hash."""
    canonical = canonical_json(
        {"task": task_name, "args": list(args), "kwargs": dict(kwargs), "context": dict(context)}
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``, as the policy lists a reviewer's key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A reviewer's public key from its policy text; ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise ValueError(
            f"a reviewer's key is written '{KEY_PREFIX}<base64>' (from `govctl reviewers keygen`)"
        )
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("the key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """A reviewer's private key from its PEM file; ValueError when it is not an Ed25519 key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM private key without a passphrase ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


@dataclass(frozen=True)
class DecisionPayload:
    """What a reviewer signs."""

    task_id: str
    tenant: str
    agent: str
    action: str
    call: str
    verdict: Verdict
    reviewer: str
    reason: str
    grant_s: int | None
    policy: str
    nonce: str
    at_ms: int
    kind: str = "hold"  # what was held: "hold" (an approval-tier action) or "cost_alert"
    #: At a cost alert: the run's new alert threshold the reviewer approves (micro-USD); None
    #: lets the policy's next step decide.
    alert_to_micro: int | None = None
    #: Who asked for the call (its context's ``user``): signed, so the self-approval rule of a
    #: grant reads it from signed data ("" in decisions signed before it was).
    requester: str = ""

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.alert_to_micro is not None:
            extra["alert_to_micro"] = self.alert_to_micro
        if self.requester:
            extra["requester"] = self.requester
        return {
            **extra,
            "v": SIGNATURE_VERSION,
            "task_id": self.task_id,
            "tenant": self.tenant,
            "agent": self.agent,
            "action": self.action,
            "call": self.call,
            "verdict": self.verdict,
            "reviewer": self.reviewer,
            "reason": self.reason,
            "grant_s": self.grant_s,
            "policy": self.policy,
            "nonce": self.nonce,
            "at_ms": self.at_ms,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionPayload:
        if data.get("v") != SIGNATURE_VERSION:
            raise ValueError(f"unknown decision version {data.get('v')!r}")
        grant = data.get("grant_s")
        return cls(
            task_id=str(data["task_id"]),
            tenant=str(data["tenant"]),
            agent=str(data["agent"]),
            action=str(data["action"]),
            call=str(data["call"]),
            verdict=_verdict(data["verdict"]),
            reviewer=str(data["reviewer"]),
            reason=str(data.get("reason", "")),
            grant_s=None if grant is None else int(grant),
            policy=str(data.get("policy", "")),
            nonce=str(data["nonce"]),
            at_ms=int(data["at_ms"]),
            kind=str(data.get("kind", "hold")),
            alert_to_micro=(
                None if data.get("alert_to_micro") is None else int(data["alert_to_micro"])
            ),
            requester=str(data.get("requester") or ""),
        )


def _verdict(value: Any) -> Verdict:
    if value == "approve":
        return "approve"
    if value == "reject":
        return "reject"
    raise ValueError(f"unknown verdict {value!r}")


def sign(key: Ed25519PrivateKey, payload: DecisionPayload) -> dict[str, Any]:
    """A signed decision, as it is stored and carried: ``{"payload": {...}, "sig": base64}``."""
    body = payload.as_dict()
    signature = key.sign(canonical_json(body).encode())
    return {"payload": body, "sig": base64.b64encode(signature).decode()}


def new_nonce() -> str:
    return secrets.token_hex(16)


def raw_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key: what makes two listed reviewers the same key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def reviewer_of(key: Ed25519PublicKey, reviewers: Mapping[str, Ed25519PublicKey]) -> str | None:
    """The name under which ``key`` is listed, if it is."""
    wanted = raw_key(key)
    for name, listed in reviewers.items():
        if raw_key(listed) == wanted:
            return name
    return None


def shared_keys(reviewers: Mapping[str, Ed25519PublicKey]) -> list[list[str]]:
    """The names listed with the same key, group by group (a policy error: one key, one
    reviewer)."""
    names: dict[bytes, list[str]] = {}
    for name, key in reviewers.items():
        names.setdefault(raw_key(key), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def verified(
    signed: Mapping[str, Any], reviewers: Mapping[str, Ed25519PublicKey]
) -> tuple[DecisionPayload | None, str]:
    """The payload of a signed decision if its signature is valid for the reviewer it names,
    listed in ``reviewers``; otherwise None and why."""
    try:
        body = dict(signed["payload"])
        payload = DecisionPayload.from_dict(body)
        signature = base64.b64decode(str(signed["sig"]), validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"a malformed decision ({exc})"
    key = reviewers.get(payload.reviewer)
    if key is None:
        return None, f"{payload.reviewer!r} is not a listed reviewer of the tenant"
    try:
        key.verify(signature, canonical_json(body).encode())
    except InvalidSignature:
        return None, f"the signature of {payload.reviewer!r}'s decision does not verify"
    return payload, ""


@dataclass(frozen=True)
class Release:
    """The verdict on the decisions a released message carries."""

    ok: bool
    reason: str
    #: The reviewers whose approvals verified (one per key), enough for the quorum or not.
    reviewers: tuple[str, ...] = ()
    payloads: tuple[DecisionPayload, ...] = ()
    #: Genuine approvals of the quorum, but the release is older than ``valid_for``.
    expired: bool = False


def check_release(
    decisions: Iterable[Mapping[str, Any]],
    *,
    reviewers: Mapping[str, Ed25519PublicKey],
    quorum: int,
    allow_self_approval: bool,
    task_id: str,
    call: str,
    requester: str | None,
    now_ms: int,
    valid_for: timedelta,
    collect_for: timedelta = timedelta(0),
    kind: str = "hold",
    tenant: str | None = None,
) -> Release:
    """Whether ``decisions`` release this call: valid signatures of ``quorum`` distinct listed
    reviewers' keys (a key counts once, whatever names it is listed under), none of them the
    requester (unless allowed), each approving this task id and this exact call of ``tenant``.
    The release counts from its last signature (the one that completed the quorum) and is valid
    for ``valid_for``; each signature may be older by ``collect_for``, the time a hold may take
    to collect its quorum (``approval.expiry``)."""
    approving: dict[bytes, DecisionPayload] = {}
    problems: list[str] = []
    for signed in decisions:
        payload, why = verified(signed, reviewers)
        if payload is None:
            problems.append(why)
            continue
        if payload.task_id != task_id or payload.call != call or payload.kind != kind:
            problems.append(f"{payload.reviewer!r} signed a decision about another call")
            continue
        if tenant is not None and payload.tenant != tenant:
            problems.append(
                f"{payload.reviewer!r} signed for tenant {payload.tenant!r}, not {tenant!r}"
            )
            continue
        if payload.verdict != "approve":
            problems.append(f"{payload.reviewer!r} rejected it")
            continue
        if requester and payload.reviewer == requester and not allow_self_approval:
            problems.append(f"{payload.reviewer!r} requested it and may not approve it")
            continue
        oldest = valid_for + collect_for
        if now_ms - payload.at_ms > oldest.total_seconds() * 1000:
            problems.append(f"{payload.reviewer!r}'s approval is older than {oldest}")
            continue
        approving.setdefault(raw_key(reviewers[payload.reviewer]), payload)
    if len(approving) >= quorum:
        names = tuple(sorted(p.reviewer for p in approving.values()))
        payloads = tuple(approving.values())
        last = max(payloads, key=lambda p: p.at_ms)
        age_ms = now_ms - last.at_ms
        if age_ms > valid_for.total_seconds() * 1000:
            return Release(
                False,
                f"the release is older than approval.valid_for ({valid_for}): its last "
                f"approval, by {last.reviewer!r}, is {timedelta(seconds=age_ms // 1000)} old",
                names,
                payloads,
                expired=True,
            )
        return Release(True, f"released by {', '.join(names)}", names, payloads)
    found = f"{len(approving)} valid approval(s) of {quorum} required"
    detail = "; ".join(dict.fromkeys(problems))
    names = tuple(sorted(p.reviewer for p in approving.values()))
    return Release(False, f"{found}" + (f": {detail}" if detail else ""), names)


@dataclass(frozen=True)
class GrantCheck:
    """Whether a stored grant is genuine and covers an action now."""

    ok: bool
    reason: str
    until_ms: int = 0
    #: Not a genuine grant at all (its signatures are not a quorum's for this tenant, or do not
    #: say who requested the call): someone wrote or copied it into Redis.
    forged: bool = False


def grant_until_ms(payloads: Sequence[DecisionPayload], max_grant: timedelta) -> int | None:
    """When a grant made by these approvals ends: every approval of the quorum asked for one,
    the shortest request counts, capped at ``max_grant`` from the last approval. None when one
    of them did not ask (one reviewer cannot give a grant that the others did not endorse)."""
    if not payloads or any(p.grant_s is None or p.grant_s <= 0 for p in payloads):
        return None
    seconds = min(min(int(p.grant_s or 0) for p in payloads), int(max_grant.total_seconds()))
    return max(p.at_ms for p in payloads) + seconds * 1000


def check_grant(
    grant: Mapping[str, Any],
    *,
    reviewers: Mapping[str, Ed25519PublicKey],
    quorum: int,
    allow_self_approval: bool,
    max_grant: timedelta,
    tenant: str,
    agent: str,
    action_names: Iterable[str],
    now_ms: int,
    requested_by: str | None = None,
) -> GrantCheck:
    """A grant lets ``agent`` of ``tenant`` take the action without approval until it ends, if
    the quorum of the tenant's reviewers signed it: the approvals of one held call of that
    tenant, agent and action, each asking for a grant. Everything it is judged on is signed
    (the tenant, the agent, the action, who requested the call): a grant written or copied into
    Redis by anyone else is not one, nor is a grant of another tenant.

    ``requested_by`` is who asks for the call the grant would lift now: a reviewer's approval
    never counts for their own request, so a grant that needs theirs to reach the quorum does
    not lift it (unless the tenant allows self-approval)."""
    decisions = [d for d in grant.get("decisions") or [] if isinstance(d, Mapping)]
    first = decisions[0].get("payload", {}) if decisions else {}
    first = first if isinstance(first, Mapping) else {}
    requesters = {
        str(d["payload"].get("requester") or "")
        for d in decisions
        if isinstance(d.get("payload"), Mapping)
    }
    requester = requesters.pop() if len(requesters) == 1 else ""
    if not requester and not allow_self_approval:
        return GrantCheck(
            False,
            "the grant's approvals do not sign who requested the call (self-approval could "
            "not be ruled out)",
            forged=True,
        )
    release = check_release(
        decisions,
        reviewers=reviewers,
        quorum=quorum,
        allow_self_approval=allow_self_approval,
        task_id=str(first.get("task_id", "")),
        call=str(first.get("call", "")),
        requester=requester or None,
        now_ms=now_ms,
        valid_for=timedelta(days=3650),
        tenant=tenant,
    )
    if not release.ok:
        return GrantCheck(False, f"grant not signed by a quorum: {release.reason}", forged=True)
    if requested_by and not allow_self_approval and requested_by in release.reviewers:
        others = len(release.reviewers) - 1
        if others < quorum:
            return GrantCheck(
                False,
                f"the grant was signed by {requested_by!r}, who requests this call (a reviewer's "
                f"approval never counts for their own request; {others} of {quorum} left)",
            )
    payload = release.payloads[0]
    if payload.agent != agent or payload.action not in set(action_names):
        return GrantCheck(False, "the grant is for another agent or action")
    until = grant_until_ms(release.payloads, max_grant)
    if until is None:
        return GrantCheck(False, "not every approval of the quorum asked for a grant")
    if now_ms >= until:
        return GrantCheck(False, "the grant has expired", until)
    return GrantCheck(True, f"granted by {', '.join(release.reviewers)}", until)
