"""A tenant removed from the policy under running workers, with tasks running, waiting and held:
nothing is stranded and nothing loops. Its tasks wait out its ``max_wait`` for it to come back,
then end with "tenant removed from the policy", audited on its own chain (which still verifies);
``govctl tenants end`` ends them at once; a tenant put back in time goes on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery

from governance.integration import governance_context
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.keys import TenantKeys
from governance.store.removed import REMOVED_REASON
from tests.e2e.conftest import Deployment
from tests.e2e.observer import ObserverServer
from tests.govctl_runner import run_govctl
from tests.polling import wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SLOW_MS = 2500


def _tenant(max_wait: str, reviewers: dict[str, str] | None = None) -> dict[str, Any]:
    tenant: dict[str, Any] = {
        "allowed_tools": ["http_get", "write_file"],
        "allowed_domains": ["127.0.0.1"],
        "allowed_networks": ["127.0.0.0/8"],
        "concurrency": 1,
        "max_wait": max_wait,
    }
    if reviewers:
        tenant |= {
            "reviewers": reviewers,
            "tiers": {"actions": {"write_file": "act_with_approval"}},
        }
    return tenant


class PolicyFile:
    """The e2e policy plus tenants of this test, in a file the workers watch."""

    def __init__(self, e2e_policy: Path, path: Path) -> None:
        self.path = path
        self.base = yaml.safe_load(e2e_policy.read_text())
        self.reviewers = dict(self.base["tenants"]["t-held-line"]["reviewers"])

    def write(self, extra: dict[str, dict[str, Any]]) -> None:
        document = json.loads(json.dumps(self.base))
        document["tenants"].update(extra)
        self.path.write_text(yaml.safe_dump(document))


@pytest.fixture
def policy(e2e_policy: Path, tmp_path: Path) -> PolicyFile:
    return PolicyFile(e2e_policy, tmp_path / "policy.yaml")


def _slow_calls(app: Celery, observer: ObserverServer, tenant: str, count: int) -> list[Any]:
    url = f"{observer.base_url}/slow?key={tenant}&ms={SLOW_MS}"
    with governance_context(ActionContext(tenant=tenant, agent="a", run=f"run-{tenant}")):
        return [app.tasks["tools.http_get"].delay(url=url) for _ in range(count)]


def _removed_status(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    result = run_govctl("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {r["tenant"]: r for r in json.loads(result.stdout)["removed"]}


def _entries(runtime: GovernanceRuntime, tenant: str, kind: str) -> list[dict[str, str]]:
    return [e.fields for e in runtime.audit_log.records(tenant) if e.fields["type"] == kind]


def _ended_with_the_reason(results: list[Any]) -> bool:
    return all(r.state == "FAILURE" and REMOVED_REASON in str(r.result) for r in results)


def test_a_removed_tenants_tasks_wait_out_its_max_wait_then_end_and_nothing_loops(
    make_deployment: Callable[..., Deployment], policy: PolicyFile, observer: ObserverServer
) -> None:
    policy.write({"t-brief": _tenant("3s")})
    deployment = make_deployment(
        GOVERNANCE_CONFIG_PATH=str(policy.path), GOVERNANCE_POLICY_CHECK_S="0.5"
    )
    deployment.start_worker("removed")
    app, runtime = deployment.app, deployment.runtime
    env = {k: v for k, v in deployment.env.items() if k.startswith("GOVERNANCE_")}
    running, *waiting = _slow_calls(app, observer, "t-brief", 3)
    wait_until(lambda: running.state == "STARTED", 20, "the first call to start")
    assert [r.state for r in waiting] == ["DEFERRED", "DEFERRED"]  # over its concurrency

    policy.write({})  # t-brief leaves the policy while one call runs and two wait
    wait_until(lambda: "t-brief" in _removed_status(env), 20, "the removal to be noticed")
    running.get(timeout=30)  # a running task finishes
    wait_until(lambda: _ended_with_the_reason(waiting), 40, "the waiting calls to end")

    keys = TenantKeys("t-brief")
    assert runtime.state.client.zcard(keys.ledger) == 0  # nothing left to publish again
    assert runtime.state.client.zcard(keys.waiting) == 0
    assert observer.observations.counts["t-brief"] == 1  # the two never ran
    (removed,) = _entries(runtime, "t-brief", "tenant_removed")
    assert "3 s unless it comes back" in removed["reason"]
    denied = _entries(runtime, "t-brief", "authorization_denied")
    assert sorted(e["task_id"] for e in denied) == sorted(r.id for r in waiting)
    assert {e["reason"] for e in denied} == {REMOVED_REASON}
    assert not _removed_status(env)  # nothing open is listed
    wait_until(lambda: not runtime.removed_tenants.marked(), 20, "the tenant to be unmarked")
    verified = run_govctl("audit", "verify", "--json", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    chains = {c["chain"]: c for c in json.loads(verified.stdout)["chains"]}
    assert chains["t-brief"]["ok"]  # a removed tenant's chain is still verified
    assert chains["t-brief"]["checked"] >= 3


def test_govctl_ends_a_removed_tenant_now_and_a_tenant_put_back_goes_on(
    make_deployment: Callable[..., Deployment], policy: PolicyFile, observer: ObserverServer
) -> None:
    tenants = {"t-gone": _tenant("1h", policy.reviewers), "t-back": _tenant("1h")}
    policy.write(tenants)
    deployment = make_deployment(
        GOVERNANCE_CONFIG_PATH=str(policy.path), GOVERNANCE_POLICY_CHECK_S="0.5"
    )
    deployment.start_worker("removed")
    app, runtime = deployment.app, deployment.runtime
    env = {k: v for k, v in deployment.env.items() if k.startswith("GOVERNANCE_")}
    gone_running, gone_waiting = _slow_calls(app, observer, "t-gone", 2)
    with governance_context(ActionContext(tenant="t-gone", agent="a", run="held", user="dana")):
        held = app.tasks["tools.write_file"].delay(path="gone.txt", content="x")
    back = _slow_calls(app, observer, "t-back", 2)
    wait_until(lambda: held.state == "HELD", 20, "the write to be held")
    wait_until(lambda: gone_running.state == "STARTED", 20, "t-gone's first call to start")

    policy.write({})

    def noticed() -> bool:
        listed = _removed_status(env)
        return all(listed.get(t, {}).get("ends_at_ms") for t in ("t-gone", "t-back"))

    wait_until(noticed, 20, "the maintenance to notice both removals")
    assert _removed_status(env)["t-gone"]["held"] == 1

    refused = run_govctl("tenants", "end", "t-basic", env=env)
    assert refused.returncode == 1
    assert "is in the policy" in refused.stderr
    nobody = run_govctl("tenants", "end", "t-nobody", env=env)
    assert nobody.returncode == 1
    assert "has no open tasks" in nobody.stderr

    ended = run_govctl("tenants", "end", "t-gone", "--json", env=env)
    assert ended.returncode == 0, ended.stderr
    assert json.loads(ended.stdout)["held"] == 1
    wait_until(lambda: _ended_with_the_reason([gone_waiting, held]), 30, "t-gone's tasks to end")
    assert gone_running.get(timeout=30)  # it was running: it finished
    noticed_entry, ended_entry = _entries(runtime, "t-gone", "tenant_removed")
    assert "end in 3600 s unless it comes back" in noticed_entry["reason"]
    assert ended_entry["reviewer"]  # the operator who ended it
    assert "ended by an operator" in ended_entry["reason"]

    # t-back comes back before its grace is over: its tasks go on.
    policy.write({"t-back": tenants["t-back"]})
    wait_until(lambda: all(r.state == "SUCCESS" for r in back), 40, "t-back's calls to run")
    assert _entries(runtime, "t-back", "tenant_restored")
    assert "t-back" not in _removed_status(env)
