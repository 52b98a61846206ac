"""A replicated Redis watched by Sentinels (the embedded group the failover tests use), on the
newest server found (the store's Sentinel test runs on both): it starts in sync, a killed
primary's replica is promoted, clients that ask the Sentinels follow it, and the old primary
comes back as a replica."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import Sentinel

from governance.embedded import EmbeddedSentinelGroup, find_newest_binaries
from tests.polling import wait_until

pytestmark = pytest.mark.slow


def test_a_killed_primary_is_replaced_by_its_replica_and_clients_follow() -> None:
    binaries = find_newest_binaries()
    with EmbeddedSentinelGroup(binaries=binaries, replicas=1, sentinels=3) as group:
        first = group.primary
        replica = group.servers[1]
        assert first is group.servers[0]
        sentinels = Sentinel(group.sentinel_addresses, socket_timeout=1)
        client = sentinels.master_for(group.master_name, socket_timeout=1)
        try:
            client.set("before", "failover")
            assert client.wait(1, 5000) == 1  # the replica has it

            first.kill()
            wait_until(
                lambda: group.master_address() == ("127.0.0.1", replica.port),
                30,
                "the Sentinels to promote the replica",
            )

            def written() -> bool:
                try:
                    return bool(client.set("after", "failover"))
                except redis.ConnectionError:
                    return False

            wait_until(written, 30, "the client to write to the new primary")
            assert group.primary is replica
            assert client.get("before") == b"failover"

            # The old primary restarts with its data and is made a replica of the new one (as
            # the Sentinels do within 10 s; done here at once).
            first.restart()
            old = redis.Redis.from_url(first.url)
            try:
                old.replicaof("127.0.0.1", replica.port)
                wait_until(
                    lambda: old.info("replication").get("master_link_status") == "up",
                    30,
                    "the old primary to sync from the new one",
                )
                assert old.get("after") == b"failover"
            finally:
                old.close()
        finally:
            client.close()
