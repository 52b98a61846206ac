"""Editing the policy file under running workers: enforced within seconds, no restart; an invalid
edit changes nothing and is reported (worker log, audit log, ``govctl policy status``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from governance.policy.context import ActionContext
from governance.policy.engine import Policy
from governance.store.keys import DEPLOYMENT_CHAIN
from tests.e2e.conftest import Deployment, to_broker, wait_until
from tests.e2e.test_e2e_govctl import govctl

pytestmark = pytest.mark.timeout(240)

CTX = ActionContext(tenant="t-basic", agent="editor", run="run-reload")


def _headers() -> dict[str, Any]:
    from governance.integration import GovernanceHeaders

    return GovernanceHeaders(context=CTX).to_headers()


def _echo_outcome(app: Celery) -> str:
    """Publish ``tools.echo`` straight to the broker (the worker alone decides): its state."""
    result = to_broker(app, "tools.echo", {"text": "reload"}, _headers())
    result.get(timeout=30, propagate=False)
    return str(result.state)


def _reports(deployment: Deployment) -> dict[str, dict[str, Any]]:
    raw = deployment.runtime.state.client.hgetall("gov:{policy}:workers")
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def test_an_edited_policy_is_enforced_without_a_restart_and_an_invalid_edit_changes_nothing(
    make_deployment: Callable[..., Deployment], e2e_policy: Path, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    shutil.copy(e2e_policy, policy_file)
    deployment = make_deployment(
        GOVERNANCE_CONFIG_PATH=str(policy_file), GOVERNANCE_POLICY_CHECK_S="0.5"
    )
    worker = deployment.start_worker("reloading")
    old_version = Policy.from_file(policy_file).version
    assert _echo_outcome(deployment.app) == "SUCCESS"

    # Take echo off t-basic's allow-list, under the running worker.
    original = policy_file.read_text()
    edited = original.replace(
        "allowed_tools: [echo, write_file, read_file, shell]",
        "allowed_tools: [write_file, read_file, shell]",
        1,
    )
    assert edited != original
    policy_file.write_text(edited)
    new_version = Policy.from_file(policy_file).version
    assert new_version != old_version
    edited_at = time.monotonic()
    wait_until(
        lambda: _echo_outcome(deployment.app) == "FAILURE",
        timeout_s=15,
        what="the worker to deny echo under the edited policy",
        poll_s=0.2,
    )
    print(f"\nenforced {time.monotonic() - edited_at:.1f} s after the edit")
    denials = [
        e
        for e in deployment.runtime.audit_log.records("t-basic")
        if e.fields["type"] == "authorization_denied" and e.fields["action"] == "echo"
    ]
    assert denials
    assert denials[-1].fields["policy_version"] == new_version
    assert "not allowed" in denials[-1].fields["reason"]
    wait_until(
        lambda: {r["version"] for r in _reports(deployment).values()} == {new_version},
        timeout_s=15,
        what="the worker to report the new version",
    )
    reloaded = [
        e
        for e in deployment.runtime.audit_log.records(DEPLOYMENT_CHAIN)
        if e.fields["type"] == "policy_reloaded"
    ]
    assert [e.fields["policy_version"] for e in reloaded] == [new_version]

    # An invalid edit: the worker keeps enforcing the version it has, and says why.
    policy_file.write_text(edited.replace("concurrency: 1", "concurrency: -1", 1))
    wait_until(
        lambda: all(r["error"] for r in _reports(deployment).values()),
        timeout_s=15,
        what="the worker to report the invalid file",
    )
    (report,) = _reports(deployment).values()
    assert report["version"] == new_version
    assert "concurrency" in report["error"]
    assert str(policy_file) in report["error"]
    assert _echo_outcome(deployment.app) == "FAILURE"  # still the edited, valid policy
    invalid = [
        e
        for e in deployment.runtime.audit_log.records(DEPLOYMENT_CHAIN)
        if e.fields["type"] == "policy_invalid"
    ]
    assert len(invalid) == 1
    assert "concurrency" in invalid[0].fields["reason"]
    assert "the changed policy file is invalid" in worker.log_path.read_text()

    settings_env = {k: v for k, v in deployment.env.items() if k.startswith("GOVERNANCE_")}
    status = govctl(settings_env, "policy", "status", "--json")
    assert status.returncode == 1, status.stderr
    assert "the policy file is invalid; the workers keep their version" in status.stderr
    listed = json.loads(status.stdout)
    assert listed["version"] is None
    assert "concurrency" in listed["error"]
    assert [(w["version"], w["current"]) for w in listed["workers"]] == [(new_version, False)]

    # Fixed again: the worker is current, and govctl says so.
    policy_file.write_text(original)
    wait_until(
        lambda: _echo_outcome(deployment.app) == "SUCCESS",
        timeout_s=15,
        what="the worker to allow echo again",
        poll_s=0.2,
    )
    wait_until(
        lambda: govctl(settings_env, "policy", "status").returncode == 0,
        timeout_s=15,
        what="govctl policy status to find every worker current",
        poll_s=0.5,
    )
