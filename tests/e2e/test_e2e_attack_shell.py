"""An agent's `shell` command tries to outlive its call and to starve other calls, through a real
root worker.

The command double-forks a `setsid` grandchild that sleeps two minutes (out of its process
group, so killing the group missed it), once ending on its own and once by the tenant's step
timeout; and a fork bomb runs next to another call. Each attack fails: the grandchild is gone
when the task's result arrives, the bomb stops at its own cap while the other call starts all of
its processes, the result names the containment that held and the failure says why. Nothing
else breaks: the next command runs, the audit verifies.

The deployment is this module's own (the test policy plus a tenant that runs `shell` without
approval, with a step timeout of 2 s, and a workspace of its own). It needs root, and skips
elsewhere (CI is root): a worker that is not root has no cgroup or uid of a call's own to give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governance.integration import ActionFailed
from governance.policy.context import ActionContext
from tests.e2e.conftest import Deployment, audit_of, verify_audit
from workers.api import submit_tool

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root (CI runs as root): only a root worker can give each shell call a "
        "cgroup or a uid of its own; elsewhere shell refuses to run (fail closed)",
    ),
]

CTX = ActionContext(tenant="t-shell", agent="attacker", run="run-shell-attack")
TENANT = """
  t-shell:
    allowed_tools: [shell]
    step_timeout: 2s
    step_timeout_error: permanent
    tiers:
      actions: {process.exec: act_auto}
"""

ESCAPE = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        # Its pid as the worker's /proc numbers it (the call's PID namespace has its own).
        open(sys.argv[1] + ".pid", "w").write(os.readlink("/proc/self"))
        os.write(w, b"x")
        time.sleep(120)
    os._exit(0)
os.close(w)
os.read(r, 1)
print(open(sys.argv[1] + ".pid").read(), flush=True)
time.sleep(float(sys.argv[2]))
"""
"""A `setsid` grandchild that sleeps two minutes (its pid in argv[1].pid); the command then
sleeps argv[2] seconds."""

HOG = """
import os, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
open("hog.full", "w").close()
deadline = time.monotonic() + 20
while not os.path.exists("other.done") and time.monotonic() < deadline:
    time.sleep(0.01)
print(children)
"""
"""Forks until its cap stops it, and holds all of it until the other call is done."""

OTHER = """
import os, time
deadline = time.monotonic() + 20
while not os.path.exists("hog.full") and time.monotonic() < deadline:
    time.sleep(0.01)
started = 0
for _ in range(6):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        started += 1
    except OSError as exc:
        print(exc)
open("other.done", "w").close()
print(started)
"""
"""Once the hog is full, starts 6 processes at once."""


@pytest.fixture
def deployment(
    make_deployment: Callable[..., Deployment], e2e_policy: Path, tmp_path: Path
) -> Deployment:
    policy = tmp_path / "policy.yaml"
    policy.write_text(e2e_policy.read_text().rstrip("\n") + "\n" + TENANT)
    workspace = tmp_path / "shell-workspace"
    workspace.mkdir()
    made = make_deployment(
        GOVERNANCE_CONFIG_PATH=str(policy), GOVERNANCE_WORKSPACE_DIR=str(workspace)
    )
    made.start_worker("shell-attack")
    return made


def workspace_of(deployment: Deployment) -> Path:
    return Path(deployment.env["GOVERNANCE_WORKSPACE_DIR"])


def shell(deployment: Deployment, *command: str) -> Any:
    return submit_tool(deployment.app, CTX, "shell", command=list(command))


def alive(pid: int) -> bool:
    """Running (a zombie has ended: only its parent's wait is missing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_setsid_grandchild_does_not_outlive_its_call(deployment: Deployment) -> None:
    workspace = workspace_of(deployment)
    ended = shell(deployment, "python3", "-c", ESCAPE, "exits", "0").get(timeout=60)
    assert ended["returncode"] == 0, ended["stderr"]
    escaped = int(ended["stdout"])
    # Gone by the time the result came: the call ended everything it started.
    assert not alive(escaped), f"the setsid grandchild {escaped} outlived its call"
    held = ended["isolation"]["containment"]
    assert "cgroup" in held or "of its own" in held, held
    assert ended["isolation"]["user"].startswith("nobody") or "the call's own" in held

    # The same, ended by the tenant's step timeout (Celery's soft time limit in the pool).
    timed_out = shell(deployment, "python3", "-c", ESCAPE, "timeout", "60")
    with pytest.raises(ActionFailed, match=r"step_timeout: the step ran 2\.\d s"):
        timed_out.get(timeout=60)
    escaped = int((workspace / "timeout.pid").read_text())
    assert not alive(escaped), f"the setsid grandchild {escaped} outlived its timed-out call"
    (failed,) = [
        e for e in audit_of(deployment.runtime, timed_out.id) if e.fields["type"] == "task_failed"
    ]
    assert json.loads(failed.fields["detail"])["kind"] == "permanent"
    assert "step_timeout" in failed.fields["reason"]

    # Nothing else broke.
    after = shell(deployment, "echo", "still here").get(timeout=60)
    assert after["stdout"] == "still here\n"
    assert verify_audit(deployment.runtime) == []


def test_a_fork_bomb_stops_at_its_cap_without_starving_another_call(
    deployment: Deployment,
) -> None:
    other = shell(deployment, "python3", "-c", OTHER)
    hog = shell(deployment, "python3", "-c", HOG)
    hog_result, other_result = hog.get(timeout=60), other.get(timeout=60)
    # The default cap is 64 processes per call: the hog and 63 children, whatever else runs.
    assert hog_result["stdout"].strip() == "63", hog_result
    assert other_result["stdout"].strip() == "6", other_result
    assert "(max 64)" in hog_result["isolation"]["containment"]
    assert verify_audit(deployment.runtime) == []
