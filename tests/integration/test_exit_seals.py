"""A process that exits owing audit seals writes them first.

Seals of a process's last entries ride on its next call to the chain; a process that exits
before one (a recycled pool process, a warm shutdown, a publisher's end) would leave them for
the leader's adoption, and ``govctl audit verify`` would report them unsealed meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from governance.embedded import EmbeddedRedis
from governance.store import (
    AuditLog,
    AuditSealer,
    StateStore,
    audit_verify,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "exit-seals-key"

ADMIT_ONCE_AND_EXIT = """
from governance.integration.runtime import GovernanceRuntime
from governance.policy import Policy
from governance.policy.actions import ToolCall
from governance.policy.context import ActionContext
from governance.policy.usage import Usage
from governance.settings import GovernanceSettings
from governance.store import AdmissionLimits

settings = GovernanceSettings()
runtime = GovernanceRuntime(settings, Policy.from_file(settings.config_path))
admitted = runtime.admitter.admit(
    ctx=ActionContext(tenant="acme", agent="a1", run="r1"),
    action=ToolCall(tool="echo", input={"text": "x"}),
    task_id="t-exit",
    attempt=0,
    estimate=Usage(steps=1, tool_calls=1),
    limits=AdmissionLimits(),
    template={"tenant": "acme", "task_id": "t-exit", "policy_version": runtime.policy.version},
)
assert admitted.admitted
assert runtime.sealer.owes("acme"), "the admission's seal must still be owed here"
"""


def test_a_process_exiting_after_an_admission_leaves_no_entry_unsealed(
    redis_server: EmbeddedRedis,
) -> None:
    env = {
        **os.environ,
        "GOVERNANCE_BROKER_URL": redis_server.url,
        "GOVERNANCE_STATE_REDIS_URL": redis_server.url,
        "GOVERNANCE_CONFIG_PATH": str(ROOT / "config" / "governance.yaml"),
        "GOVERNANCE_AUDIT_KEY": KEY,
    }
    env.pop("REDIS_URL", None)
    subprocess.run(
        [sys.executable, "-c", ADMIT_ONCE_AND_EXIT], env=env, cwd=ROOT, check=True, timeout=60
    )
    log = AuditLog(StateStore(redis.Redis.from_url(redis_server.url)), AuditSealer(KEY.encode()))
    # No grace: an entry without its seal would be a break at once.
    report = audit_verify.verify(log, KEY.encode(), "acme", seal_grace_ms=0)
    assert report.checked == 1
    assert report.ok, report.breaks
