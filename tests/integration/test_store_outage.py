"""A worker process and an outage of the state store, against a real Redis it stops.

Right after an outage every lease looks expired, though its holders were only cut off: no
process may take them until the holders had a lease period to renew. A process learns of the
outage from its own calls failing, or, when it made none meanwhile, from its lease thread's
liveness probe.
"""

from __future__ import annotations

import time
from pathlib import Path

from governance.embedded import EmbeddedRedis
from governance.integration.runtime import GovernanceRuntime
from governance.policy import Policy
from governance.settings import GovernanceSettings
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_a_process_idle_during_an_outage_takes_no_lease_right_after_it(
    redis_server: EmbeddedRedis,
) -> None:
    settings = GovernanceSettings(
        broker_url=redis_server.url,
        state_redis_url=redis_server.url,
        config_path=ROOT / "config" / "governance.yaml",
        lease_ms=900,
        state_timeout_s=0.5,
    )
    runtime = GovernanceRuntime(settings, Policy.from_file(settings.config_path))
    runtime.state.client.ping()
    runtime.leases.start()  # as in a pool process that has run a governed task
    assert runtime.health.may_reclaim
    redis_server.halt()
    # No call of its own fails: the lease thread's probe finds the store down.
    wait_until(lambda: not runtime.health.may_reclaim, 10, "the process to learn of the outage")
    redis_server.restart()
    back = time.monotonic()
    wait_until(lambda: runtime.health.may_reclaim, 20, "the grace after the outage to end")
    # Not before the holders had a lease period (and a heartbeat) to renew.
    assert time.monotonic() - back >= settings.lease_ms / 1000
