"""Attacks with write access to the state Redis (what every ``govctl`` user has), and with a
reviewer's key, against a real worker and ``govctl``: what reviewers see is what runs, counts
they are told are verified, and a grant binds to its tenant and never serves its signer's own
request (docs/trust.md, "The state Redis" and "A reviewer's key").
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.integration.approvals.reviewers import Reviewers
from governance.integration.headers import message_call
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.policy.signing import DecisionPayload, new_nonce, new_private_key, sign
from governance.store.held import HeldStatus, HeldStore
from governance.store.keys import TenantKeys
from tests.e2e.conftest import audit_of, types_of
from tests.e2e.test_e2e_govctl import govctl
from tests.govctl_runner import run_govctl_process
from workers.api import submit_tool

pytestmark = pytest.mark.timeout(120)


def held_write(app: Celery, tenant: str, name: str, content: str) -> Any:
    ctx = ActionContext(tenant=tenant, agent="cli-agent", run="run-attack", user="dana")
    result = submit_tool(app, ctx, "write_file", path=name, content=content)
    assert result.state == "HELD"
    return result


def held_fields(runtime: GovernanceRuntime, tenant: str, task_id: str) -> dict[str, str]:
    raw = runtime.state.client.hgetall(TenantKeys(tenant).held(task_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def switch_envelope(
    runtime: GovernanceRuntime, tenant: str, task_id: str, kwargs: dict[str, Any]
) -> dict[str, str]:
    """What an attacker with the state Redis does: put another call in the held message, and the
    call hash that goes with it, leaving the fields shown to reviewers as they were."""
    fields = held_fields(runtime, tenant, task_id)
    envelope = json.loads(fields["envelope"])
    envelope["kwargs"] = kwargs
    context = ActionContext.model_validate_json(envelope["options"]["headers"]["gov_context"])
    call = message_call(envelope["task"], envelope["args"], kwargs, context)
    edited = {"envelope": json.dumps(envelope), "call": call}
    runtime.state.client.hset(TenantKeys(tenant).held(task_id), mapping=edited)
    return fields


def test_a_held_call_switched_in_redis_is_refused_not_shown_as_the_benign_one(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    """Attack 1, bait and switch: the held message and its call hash are edited; the fields
    ``held show`` used to display are not."""
    benign, evil = f"benign-{uuid.uuid4().hex[:8]}.txt", f"evil-{uuid.uuid4().hex[:8]}.txt"
    held = held_write(app, "t-held", benign, "hello")
    switch_envelope(runtime, "t-held", held.id, {"path": evil, "content": "pwned"})

    shown = govctl(e2e_env, "held", "show", held.id)
    assert shown.returncode == 1
    assert "its record disagrees with its message (arguments, action)" in shown.stderr
    assert "edited in the state Redis" in shown.stderr
    approved = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert approved.returncode == 1
    assert "edited in the state Redis" in approved.stderr
    assert HeldStore(runtime.state).get("t-held", held.id).status is HeldStatus.HELD  # type: ignore[union-attr]
    assert "held_tampered" in types_of(audit_of(runtime, held.id))
    time.sleep(0.5)  # a release would publish the switched call here: nothing may run
    assert not (workspace / evil).exists()
    assert not (workspace / benign).exists()


def test_a_held_call_edited_consistently_shows_what_would_run(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
) -> None:
    """An attacker who edits every field alike cannot hide the switch: what is shown is the
    message a release would publish, derived from it."""
    evil = f"evil-{uuid.uuid4().hex[:8]}.txt"
    held = held_write(app, "t-held", f"benign-{uuid.uuid4().hex[:8]}.txt", "hello")
    kwargs = {"path": evil, "content": "pwned"}
    fields = switch_envelope(runtime, "t-held", held.id, kwargs)
    action = json.loads(fields["action"])
    action["input"] = kwargs
    runtime.state.client.hset(
        TenantKeys("t-held").held(held.id),
        mapping={"kwargs": json.dumps(kwargs), "action": json.dumps(action)},
    )
    shown = govctl(e2e_env, "held", "show", held.id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["call"]["path"] == evil


def forged_approval(task: Any, reviewer: str, call: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    payload = DecisionPayload(
        task_id=task.task_id,
        tenant=task.tenant,
        agent=task.agent,
        action=task.action_name,
        call=call,
        verdict="approve",
        reviewer=reviewer,
        reason="looks fine",
        grant_s=None,
        policy="v",
        nonce=new_nonce(),
        at_ms=int(time.time() * 1000),
        requester=task.user,
    )
    return sign(key, payload)


def test_govctl_counts_only_approvals_it_verified(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    """Attack 12: a forged approval ("bob", signed with a key that is not bob's) is written
    into the held record of a quorum-2 tenant; an honest reviewer's approval must not be told
    it completed the quorum, and nothing runs."""
    name = f"forged-{uuid.uuid4().hex[:8]}.txt"
    held = held_write(app, "t-quorum", name, "hello")
    task = HeldStore(runtime.state).get("t-quorum", held.id)
    assert task is not None
    forged = forged_approval(task, "bob", task.call, new_private_key())
    decision = {"verdict": "approve", "reviewer": "bob", "reason": "", "at_ms": 0, "signed": forged}
    runtime.state.client.hset(
        TenantKeys("t-quorum").held(held.id),
        mapping={"decisions": json.dumps([decision]), "approvals": 1},
    )
    approved = govctl(
        e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]), "--json"
    )
    assert approved.returncode == 0, approved.stderr
    outcome = json.loads(approved.stdout)
    assert (outcome["outcome"], outcome["approvals"], outcome["quorum"]) == ("recorded", 1, 2)
    assert HeldStore(runtime.state).get("t-quorum", held.id).status is HeldStatus.HELD  # type: ignore[union-attr]
    assert "forged_release" in types_of(audit_of(runtime, held.id))
    shown = json.loads(govctl(e2e_env, "held", "show", held.id, "--json").stdout)
    assert (shown["approvals"], shown["approved_by"]) == (1, ["alice"])
    time.sleep(0.5)
    assert not (workspace / name).exists()
    # An honest second reviewer completes the quorum: it runs, once.
    released = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["carol"]))
    assert released.returncode == 0, released.stderr
    assert "2 of 2 approvals" in released.stdout
    held.get(timeout=30)
    assert (workspace / name).read_text() == "hello"


def granted(
    app: Celery, runtime: GovernanceRuntime, keys: dict[str, Ed25519PrivateKey]
) -> tuple[str, dict[str, Any]]:
    """A genuine grant of t-held (quorum 1): alice approves dana's held write with a grant."""
    held = held_write(app, "t-held", f"grant-{uuid.uuid4().hex[:8]}.txt", "x")
    outcome = Reviewers(app, runtime).approve(
        held.id, keys["alice"], "fine", grant_for=timedelta(hours=1)
    )
    assert outcome.grant_id is not None
    held.get(timeout=30)
    raw = runtime.state.client.hget(TenantKeys("t-held").grants, outcome.grant_id)
    return outcome.grant_id, json.loads(raw)


def write_as(app: Celery, tenant: str, user: str) -> Any:
    ctx = ActionContext(tenant=tenant, agent="cli-agent", run="run-attack", user=user)
    return submit_tool(app, ctx, "write_file", path=f"w-{uuid.uuid4().hex[:8]}.txt", content="y")


def test_a_grant_copied_into_another_tenant_lifts_nothing_there(
    app: Celery, runtime: GovernanceRuntime, keys: dict[str, Ed25519PrivateKey]
) -> None:
    """Attack 7: t-held and t-expiry list the same reviewer keys (quorum 1 both); t-held's
    genuine grant, copied into t-expiry's grants, must not lift t-expiry's call."""
    grant_id, record = granted(app, runtime, keys)
    assert write_as(app, "t-held", "dana").get(timeout=30)["path"]  # the grant works at home
    runtime.state.client.hset(TenantKeys("t-expiry").grants, grant_id, json.dumps(record))
    copied = write_as(app, "t-expiry", "dana")
    assert copied.state == "HELD"
    entries = [
        e.fields
        for e in runtime.audit_log.records("t-expiry")
        if e.fields["type"] == "forged_release"
    ]
    assert any("signed for tenant 't-held', not 't-expiry'" in e["reason"] for e in entries)


def test_a_reviewers_grant_never_lifts_her_own_request(
    app: Celery, runtime: GovernanceRuntime, keys: dict[str, Ed25519PrivateKey]
) -> None:
    """Attack 8: alice's grant (given on dana's request) covers the agent's action for others,
    never for a call alice herself requests, whatever the stored record says of the requester."""
    grant_id, record = granted(app, runtime, keys)
    runtime.state.client.hset(
        TenantKeys("t-held").grants, grant_id, json.dumps({**record, "requester": ""})
    )
    assert write_as(app, "t-held", "erin").get(timeout=30)["path"]
    assert write_as(app, "t-held", "alice").state == "HELD"


def test_one_key_under_two_reviewer_names_is_refused_by_the_policy_check(
    e2e_policy: Path, tmp_path: Path
) -> None:
    """Attack 9: the same public key listed under two names would count twice toward a quorum
    of 2; the policy is refused, naming both (workers refuse to start with it, and the quorum
    counts distinct keys anyway: tests/policy/test_policy_signing.py)."""
    text = e2e_policy.read_text()
    alice = text.split('alice: "', 1)[1].split('"', 1)[0]
    doubled = text.replace('reviewers: {alice: "', f'reviewers: {{alias: "{alice}", alice: "', 1)
    path = tmp_path / "doubled.yaml"
    path.write_text(doubled)
    checked = run_govctl_process("policy", "check", str(path))
    assert checked.returncode == 5
    assert "alias and alice are listed with the same key" in checked.stderr
