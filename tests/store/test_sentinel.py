"""The state store behind Sentinels, on both servers: its calls (the hot path's own connections
too) go to the primary the Sentinels name, fail as an outage while a failover runs, and go to
the promoted replica after it, which has what was replicated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from governance.embedded import EmbeddedSentinelGroup, RedisBinaries
from governance.settings import GovernanceSettings
from governance.store import StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.connection import connect
from governance.store.errors import StoreUnavailable
from governance.store.keys import TenantKeys
from governance.store.limits import AdmissionLimits
from tests.polling import wait_until
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool

pytestmark = pytest.mark.slow

ONE_SLOT = AdmissionLimits(concurrency=1)


@pytest.fixture
def group(store_server: RedisBinaries) -> Iterator[EmbeddedSentinelGroup]:
    with EmbeddedSentinelGroup(binaries=store_server, replicas=1, sentinels=3) as started:
        yield started


def _state(group: EmbeddedSentinelGroup) -> StateStore:
    settings = GovernanceSettings(
        state_sentinels=group.sentinels_setting,
        state_sentinel_master=group.master_name,
        state_redis_url="redis:///1",
        state_timeout_s=1,
    )
    return StateStore(connect(settings.state_url, **settings.state_connection()), lease_ms=5_000)


def _admit(admitter: Admitter, task: str) -> AdmissionStatus:
    return admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id=task,
        attempt=0,
        estimate=TOOL_STEP,
        limits=ONE_SLOT,
        envelope=envelope(task),
    ).status


def test_the_store_follows_the_primary_the_sentinels_name_through_a_failover(
    group: EmbeddedSentinelGroup,
) -> None:
    state = _state(group)
    admitter = Admitter(state)
    try:
        assert _admit(admitter, "first") is AdmissionStatus.ADMITTED
        assert _admit(admitter, "second") is AdmissionStatus.WAITING
        primary, replica = group.servers
        assert state.client.wait(1, 5000) == 1  # the replica has both
        # The database of the URL is used: the records are in database 1 of the primary.
        direct = redis.Redis.from_url(primary.url.replace("/0", "/1"))
        try:
            assert direct.exists(TenantKeys("acme").task("second")) == 1
        finally:
            direct.close()

        primary.kill()
        with pytest.raises(StoreUnavailable):  # nobody is the primary yet: an outage
            _admit(admitter, "third")

        def admitted_again() -> AdmissionStatus | None:
            try:
                return _admit(admitter, "third")
            except StoreUnavailable:
                return None

        # The promoted replica has both: a third task waits behind them, on its connection.
        assert wait_until(admitted_again, 30, "the store to reach the promoted replica") is (
            AdmissionStatus.WAITING
        )
        assert group.primary is replica
        assert state.client.zrange(TenantKeys("acme").waiting, 0, -1) == [
            TenantKeys("acme").task(t).encode() for t in ("second", "third")
        ]
    finally:
        state.close()


def test_sentinel_settings_are_checked_when_read() -> None:
    with pytest.raises(ValueError, match="'nohost' is not host:port"):
        GovernanceSettings(state_sentinels="nohost")
    with pytest.raises(ValueError, match="exclude each other"):
        GovernanceSettings(state_sentinels="127.0.0.1:26379", state_redis_cluster=True)
    # With Sentinels, a RabbitMQ broker needs no state URL.
    settings = GovernanceSettings(
        broker_url="amqp://guest@127.0.0.1//", state_sentinels="127.0.0.1:26379"
    )
    assert settings.state_connection()["sentinels"] == [("127.0.0.1", 26379)]
