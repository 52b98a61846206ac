"""govctl end to end: real Redis, a real worker, and ``govctl`` (in the test's process, as
``tests.govctl_runner`` runs it; 20 racing approvals as processes of their own).

Held actions are created with ``workers.api.submit_tool`` (state HELD, nothing enqueued); the
reviewers' decisions go through ``govctl`` exactly as an operator types them.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from governance.embedded import EmbeddedRedis
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus, HeldStore
from governance.store.keys import TenantKeys
from tests import govctl_runner as runner
from tests.e2e.conftest import audit_of, types_of, wait_until
from workers.api import submit_llm, submit_tool

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


def govctl_process(e2e_env: dict[str, str], *args: str, **env: str) -> subprocess.Popen[str]:
    """``govctl ARGS`` as a process of its own, with the deployment's settings."""
    return runner.govctl_process(*args, env={**e2e_env, **env})


def govctl(e2e_env: dict[str, str], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``govctl ARGS`` with the deployment's settings, in this process."""
    return runner.run_govctl(*args, env={**e2e_env, **env})


def ctx(tenant: str, user: str = "dana") -> ActionContext:
    return ActionContext(tenant=tenant, agent="cli-agent", run="run-govctl", user=user)


def hold_write(app: Celery, tenant: str, workspace: Path, user: str = "dana") -> tuple[Any, Path]:
    """A held write_file call of ``tenant``, and the file it would write."""
    name = f"govctl-{uuid.uuid4().hex[:12]}.txt"
    result = submit_tool(app, ctx(tenant, user), "write_file", path=name, content="written")
    assert result.state == "HELD"
    return result, workspace / name


def status_of(runtime: GovernanceRuntime, tenant: str, task_id: str) -> HeldStatus:
    task = HeldStore(runtime.state).get(tenant, task_id)
    assert task is not None
    return task.status


def ran_once(runtime: GovernanceRuntime, task_id: str) -> None:
    """The body ran exactly once: one task_started, and nothing more after it finished."""
    wait_until(lambda: "task_finished" in types_of(audit_of(runtime, task_id)), 30, "task_finished")
    time.sleep(1.0)  # a second run would start here: it must not
    assert types_of(audit_of(runtime, task_id)).count("admitted") == 1


def test_approve_runs_it_exactly_once_and_a_second_approval_is_refused(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, path = hold_write(app, "t-held", workspace)
    listed = json.loads(govctl(e2e_env, "held", "list", "--tenant", "t-held", "--json").stdout)
    assert [t["task_id"] for t in listed["tasks"]] == [held.id]

    approved = govctl(
        e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]), "--reason", "ok"
    )
    assert approved.returncode == 0, approved.stderr
    assert "released" in approved.stdout
    assert held.get(timeout=30)["bytes"] == len("written")
    assert path.read_text() == "written"
    ran_once(runtime, held.id)

    again = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["bob"]))
    assert again.returncode == 1
    assert "not held (status: released)" in again.stderr
    assert "Traceback" not in again.stderr
    shown = json.loads(govctl(e2e_env, "held", "show", held.id, "--json").stdout)
    assert shown["status"] == "released"
    assert [(d["reviewer"], d["reason"]) for d in shown["decisions"]] == [("alice", "ok")]
    tail = json.loads(govctl(e2e_env, "audit", "tail", "-n", "50", "--json").stdout)
    released = [e for e in tail if e["task_id"] == held.id and e["type"] == "released"]
    assert [e["reviewer"] for e in released] == ["alice"]


def test_twenty_racing_approvals_release_it_once(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, path = hold_write(app, "t-held", workspace)
    reviewers = ("alice", "bob", "carol")
    processes = [
        govctl_process(
            e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys[reviewers[i % 3]])
        )
        for i in range(20)
    ]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    winners = [o for o in outcomes if o[0] == 0]
    losers = [o for o in outcomes if o[0] != 0]
    assert len(winners) == 1, outcomes
    assert "released" in winners[0][1]
    assert len(losers) == 19
    for code, _, stderr in losers:
        assert code == 1
        assert "not held (status: released)" in stderr, stderr
        assert "Traceback" not in stderr
    held.get(timeout=30)
    assert path.read_text() == "written"
    ran_once(runtime, held.id)


def test_quorum_of_two_needs_two_distinct_reviewers(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, path = hold_write(app, "t-quorum", workspace)
    first = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert first.returncode == 0, first.stderr
    assert "1 of 2" in first.stdout
    assert status_of(runtime, "t-quorum", held.id) is HeldStatus.HELD

    same = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert same.returncode == 1
    assert "'alice' already approved" in same.stderr
    time.sleep(0.5)
    assert not path.exists()
    assert status_of(runtime, "t-quorum", held.id) is HeldStatus.HELD

    second = govctl(
        e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["bob"]), "--json"
    )
    assert second.returncode == 0, second.stderr
    outcome = json.loads(second.stdout)
    assert (outcome["outcome"], outcome["approvals"], outcome["quorum"]) == ("released", 2, 2)
    held.get(timeout=30)
    assert path.read_text() == "written"
    ran_once(runtime, held.id)


def test_self_approval_is_refused_and_the_reviewer_is_whoever_holds_the_key(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, path = hold_write(app, "t-held", workspace, user="alice")
    own = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert own.returncode == 1
    assert "'alice' requested task" in own.stderr
    assert "may not approve it" in own.stderr
    assert status_of(runtime, "t-held", held.id) is HeldStatus.HELD

    # No --key: GOVERNANCE_REVIEWER_KEY; the name recorded is the key's, whatever else says.
    as_carol = {"GOVERNANCE_REVIEWER_KEY": str(reviewer_keys["carol"]), "USER": "alice"}
    released = govctl(e2e_env, "held", "approve", held.id, **as_carol)
    assert released.returncode == 0, released.stderr
    held.get(timeout=30)
    assert path.read_text() == "written"
    shown = json.loads(govctl(e2e_env, "held", "show", held.id, "--json").stdout)
    assert [(d["reviewer"], d["signed"]) for d in shown["decisions"]] == [("carol", True)]


def test_a_key_that_is_not_a_reviewers_is_refused(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    tmp_path: Path,
) -> None:
    made = govctl(e2e_env, "reviewers", "keygen", "mallory", "--out", str(tmp_path / "m.key"))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("mallory: ed25519:")
    assert (tmp_path / "m.key").stat().st_mode & 0o777 == 0o600
    held, path = hold_write(app, "t-held", workspace)
    refused = govctl(e2e_env, "held", "approve", held.id, "--key", str(tmp_path / "m.key"))
    assert refused.returncode == 1
    assert "this key is not a reviewer's of tenant 't-held'" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = govctl(e2e_env, "held", "approve", held.id)
    assert missing.returncode == 2
    assert "--key" in missing.stderr
    time.sleep(0.5)
    assert status_of(runtime, "t-held", held.id) is HeldStatus.HELD
    assert not path.exists()


def test_reject_records_the_reason_and_the_body_never_runs(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, path = hold_write(app, "t-held", workspace)
    rejected = govctl(
        e2e_env,
        "held",
        "reject",
        held.id,
        "--key",
        str(reviewer_keys["bob"]),
        "--reason",
        "too risky today",
    )
    assert rejected.returncode == 0, rejected.stderr
    wait_until(lambda: held.state == "FAILURE", 10, "the result to become FAILURE")
    assert type(held.result).__name__ == "ApprovalRejected"
    assert "too risky today" in str(held.result)
    assert "bob" in str(held.result)
    entries = audit_of(runtime, held.id)
    assert "admitted" not in types_of(entries)
    rejection = next(e for e in entries if e.fields["type"] == "rejected")
    assert rejection.fields["reviewer"] == "bob"
    assert "too risky today" in rejection.fields["reason"]
    time.sleep(0.5)
    assert not path.exists()
    late = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert late.returncode == 1
    assert "not held (status: rejected)" in late.stderr


def test_expire_rejects_a_hold_past_its_expiry(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    # Every worker sweeps expired holds too (every few seconds), so the worker may win the race
    # for one task; try again with a new task until govctl is the one that expired it.
    store = HeldStore(runtime.state)
    for _attempt in range(6):
        held, path = hold_write(app, "t-expiry", workspace)
        task = store.get("t-expiry", held.id)
        assert task is not None
        assert task.expires_ms - task.requested_ms == 1000
        wait_until(lambda t=task: time.time() * 1000 > t.expires_ms + 20, 5, "the hold to expire")
        result = govctl(e2e_env, "held", "expire", "--json")
        assert result.returncode == 0, result.stderr
        expired = [t["task_id"] for t in json.loads(result.stdout)["expired"]]
        assert status_of(runtime, "t-expiry", held.id) is HeldStatus.EXPIRED
        wait_until(lambda h=held: h.state == "FAILURE", 10, "the result to become FAILURE")
        assert type(held.result).__name__ == "ApprovalRejected"
        assert "expired" in str(held.result)
        assert not path.exists()
        if held.id in expired:
            break
    else:
        pytest.fail("the workers' sweep expired every attempt before govctl could")
    late = govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"]))
    assert late.returncode == 1
    assert "not held (status: expired)" in late.stderr


def test_audit_verify_passes_after_a_run_and_names_a_tampered_entry(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
    state_server: EmbeddedRedis,
) -> None:
    held, _ = hold_write(app, "t-held", workspace)
    assert (
        govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["alice"])).returncode
        == 0
    )
    held.get(timeout=30)
    ran_once(runtime, held.id)
    verified = govctl(e2e_env, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "entries verified" in verified.stdout

    released = next(e for e in audit_of(runtime, held.id) if e.fields["type"] == "released")
    client = redis.Redis.from_url(state_server.url)
    try:
        stream = TenantKeys("t-held").audit
        entries = client.xrange(stream)
        client.delete(stream)
        for entry_id, fields in entries:
            if entry_id.decode() == released.id:
                fields[b"reviewer"] = b"mallory"
            client.xadd(stream, fields, id=entry_id)
    finally:
        client.close()
    broken = govctl(e2e_env, "audit", "verify")
    assert broken.returncode == 4
    assert released.id in broken.stderr
    assert "altered" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_usage_of_a_tenant_as_json(
    app: Celery,
    runtime: GovernanceRuntime,
    workspace: Path,
    e2e_env: dict[str, str],
    reviewer_keys: dict[str, Path],
) -> None:
    held, _ = hold_write(app, "t-held", workspace)
    assert (
        govctl(e2e_env, "held", "approve", held.id, "--key", str(reviewer_keys["bob"])).returncode
        == 0
    )
    held.get(timeout=30)
    result = govctl(e2e_env, "usage", "--tenant", "t-held", "--run", "run-govctl", "--json")
    assert result.returncode == 0, result.stderr
    usage = {row["period"]: row for row in json.loads(result.stdout)["usage"]}
    assert set(usage) == {"day", "month", "run"}
    assert usage["run"]["window"] == "run-govctl"
    wait_until(
        lambda: (
            json.loads(govctl(e2e_env, "usage", "-t", "t-held", "--json").stdout)["usage"][0][
                "tool_calls"
            ]
            >= 1
        ),
        10,
        "the write to be counted",
    )


def test_submit_wait_that_times_out_says_what_the_task_waits_for(
    app: Celery, runtime: GovernanceRuntime, e2e_env: dict[str, str]
) -> None:
    busy = submit_llm(
        app,
        ActionContext(tenant="t-line", agent="agent-1", run="run-busy"),
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": "[[sleep 4000]] hold the only slot"}],
        max_tokens=5,
    )
    wait_until(
        lambda: runtime.ledger.status("t-line", overdue_after_ms=60_000).running == 1,
        30,
        "the slow call to hold the tenant's only slot",
    )
    result = govctl(
        e2e_env, "submit", "tool", "echo", "-t", "t-line", "-a", "agent-1", "--run", "run-wait",
        "-i", "text=later", "--wait", "1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "did not finish within 1s (state: DEFERRED: " in result.stderr
    assert "concurrency_limit" in result.stderr
    busy.get(timeout=60)
