"""Confirming that a task's record is durable (``store.durability``): on a single server and a
cluster with AOF (Valkey: WAITAOF), what a confirmation costs, what it answers without a
replica, on a Redis 6.2, and after a failover that lost a record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from governance.embedded import (
    EmbeddedRedis,
    EmbeddedRedisCluster,
    EmbeddedSentinelGroup,
    RedisBinaries,
    find_redis_binaries,
)
from governance.store import StateStore
from governance.store.durability import Durability, DurabilityRule, Verdict
from governance.store.keys import TenantKeys
from governance.store.ledger import Ledger
from tests.polling import wait_until
from tests.store.helpers import envelope

#: Tenants whose keys are on more than one node of a 3-master cluster (checked below).
TENANTS = ("acme", "beta", "gamma")


@pytest.fixture(scope="module")
def aof_server(valkey_binaries: RedisBinaries) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(appendonly=True, binaries=valkey_binaries) as server:
        yield server


@pytest.fixture(scope="module")
def aof_cluster(valkey_binaries: RedisBinaries) -> Iterator[EmbeddedRedisCluster]:
    with EmbeddedRedisCluster(3, binaries=valkey_binaries, appendonly=True) as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
def aof_state(request: pytest.FixtureRequest) -> Iterator[StateStore]:
    """A StateStore on a Valkey with AOF: one server, or a 3-master cluster (flushed)."""
    client: Any
    if request.param == "single":
        server: EmbeddedRedis = request.getfixturevalue("aof_server")
        client = redis.Redis.from_url(server.url)
        client.flushall()
    else:
        cluster: EmbeddedRedisCluster = request.getfixturevalue("aof_cluster")
        client = RedisCluster(startup_nodes=cluster.startup_nodes)
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    state = StateStore(client)
    yield state
    state.close()


def _commands(state: StateStore) -> dict[str, int]:
    """Calls per command, summed over every primary (counted by the servers)."""
    client = state.client
    if isinstance(client, RedisCluster):
        stats = client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        nodes = list(stats.values())
    else:
        nodes = [client.info("commandstats")]
    found: dict[str, int] = {}
    for node in nodes:
        for name, value in node.items():
            found[name] = found.get(name, 0) + int(value["calls"])
    return found


def test_records_that_are_there_are_durable_and_one_that_is_not_is_missing(
    aof_state: StateStore,
) -> None:
    ledger = Ledger(aof_state)
    items = []
    for tenant in TENANTS:
        for n in range(3):
            ledger.record_published(tenant, f"{tenant}-{n}", envelope(f"{tenant}-{n}"))
            items.append((tenant, f"{tenant}-{n}"))
    # A held task's record has no message of its own (the held store has it); one that ended
    # has nothing left to lose.
    aof_state.client.hset(TenantKeys("acme").task("held"), mapping={"where": "held"})
    aof_state.client.hset(TenantKeys("acme").task("ended"), mapping={"where": "done"})
    items += [("acme", "held"), ("acme", "ended"), ("beta", "never-recorded")]
    result = Durability(aof_state, DurabilityRule(local=True)).confirm(items)
    assert result.problems == []
    assert result.verdicts.pop(("beta", "never-recorded")) is Verdict.MISSING
    assert set(result.verdicts.values()) == {Verdict.DURABLE}
    assert len(result.verdicts) == len(items) - 1


def test_a_batch_costs_one_fsync_wait_per_server(aof_state: StateStore) -> None:
    ledger = Ledger(aof_state)
    items = [(t, f"{t}-{n}") for t in TENANTS for n in range(50)]
    for tenant, task in items:
        ledger.record_published(tenant, task, envelope(task))
    servers = 1
    if isinstance(aof_state.client, RedisCluster):  # the nodes the tenants' keys are on
        nodes = {aof_state.client.get_node_from_key(TenantKeys(t).barrier).name for t in TENANTS}
        servers = len(nodes)
        assert servers > 1
    before = _commands(aof_state)
    verdicts = Durability(aof_state, DurabilityRule(local=True)).confirm(items).verdicts
    after = _commands(aof_state)
    assert set(verdicts.values()) == {Verdict.DURABLE}
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert spent["cmdstat_waitaof"] == servers
    assert spent["cmdstat_incrby"] == servers
    assert spent["cmdstat_hmget"] == len(items)


def test_without_the_replicas_asked_for_nothing_is_confirmed(aof_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(aof_server.url)
    client.flushall()
    state = StateStore(client)
    try:
        Ledger(state).record_published("acme", "t1", envelope("t1"))
        rule = DurabilityRule(local=True, replicas=1, timeout_ms=100)
        result = Durability(state, rule).confirm([("acme", "t1"), ("acme", "nothing")])
        assert result.verdicts == {
            ("acme", "t1"): Verdict.UNCONFIRMED,
            ("acme", "nothing"): Verdict.MISSING,
        }
        assert result.problems == ["0 of 1 replica(s) received it within 100 ms"]
    finally:
        state.close()


def test_a_redis_6_2_confirms_what_it_can_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = find_redis_binaries()
    if old.has_waitaof:
        pytest.skip(f"the default server here is {old.label}, which has WAITAOF")
    with EmbeddedRedis(appendonly=True, binaries=old) as server:
        state = StateStore(redis.Redis.from_url(server.url))
        try:
            Ledger(state).record_published("acme", "t1", envelope("t1"))
            durability = Durability(state, DurabilityRule(local=True, replicas=0))
            with caplog.at_level(logging.WARNING, logger="governance.durability"):
                for _ in range(3):
                    verdicts = durability.confirm([("acme", "t1"), ("acme", "t2")]).verdicts
                    assert verdicts == {
                        ("acme", "t1"): Verdict.DURABLE,
                        ("acme", "t2"): Verdict.MISSING,
                    }
        finally:
            state.close()
    (said,) = [r.getMessage() for r in caplog.records]
    assert "has no WAITAOF (it needs Redis 7.2+ or Valkey)" in said
    assert "only that its record is there, not that it is on the primary's disk" in said


def test_a_server_without_an_aof_is_said_once(
    valkey_binaries: RedisBinaries, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedRedis(appendonly=False, binaries=valkey_binaries) as server:
        state = StateStore(redis.Redis.from_url(server.url))
        try:
            Ledger(state).record_published("acme", "t1", envelope("t1"))
            durability = Durability(state, DurabilityRule(local=True))
            with caplog.at_level(logging.WARNING, logger="governance.durability"):
                for _ in range(2):
                    assert durability.confirm([("acme", "t1")]).verdicts == {
                        ("acme", "t1"): Verdict.DURABLE
                    }
        finally:
            state.close()
    (said,) = [r.getMessage() for r in caplog.records]
    assert "runs without an AOF (appendonly no)" in said


@pytest.mark.slow
def test_a_record_the_promoted_replica_never_received_is_missing_there(
    valkey_binaries: RedisBinaries,
) -> None:
    with EmbeddedSentinelGroup(binaries=valkey_binaries, replicas=1, sentinels=1) as group:
        primary, replica = group.servers
        state = StateStore(redis.Redis.from_url(primary.url))
        on_replica = Durability(state, DurabilityRule(local=True, replicas=1, timeout_ms=200))
        ledger = Ledger(state)
        try:
            ledger.record_published("acme", "before", envelope("before"))
            # The precondition: the replica has it (a replica still syncing, or slow to fsync
            # under load, misses the first 200 ms confirmation; a later one sees it there).
            wait_until(
                lambda: (
                    on_replica.confirm([("acme", "before")]).verdicts
                    == {("acme", "before"): Verdict.DURABLE}
                ),
                30,
                "the record to be confirmed on the replica",
            )
            # The replica falls behind: stopped, and its link to the primary cut.
            replica.pause()
            state.client.client_kill_filter(_type="replica")
            wait_until(
                lambda: state.client.info("replication")["connected_slaves"] == 0,
                10,
                "the primary to drop its replica",
            )
            ledger.record_published("acme", "after", envelope("after"))
            result = on_replica.confirm([("acme", "before"), ("acme", "after")])
            assert set(result.verdicts.values()) == {Verdict.UNCONFIRMED}
            assert result.problems == ["0 of 1 replica(s) received it within 200 ms"]
            primary.kill()
            replica.resume()
            wait_until(
                lambda: group.master_address() == ("127.0.0.1", replica.port),
                30,
                "the Sentinel to promote the replica",
            )
        finally:
            state.close()
        promoted = StateStore(redis.Redis.from_url(replica.url))
        try:
            wait_until(
                lambda: promoted.client.info("replication")["role"] == "master",
                10,
                "the replica to take the primary's role",
            )
            verdicts = Durability(promoted, DurabilityRule(local=True)).confirm(
                [("acme", "before"), ("acme", "after")]
            )
            assert verdicts.verdicts == {
                ("acme", "before"): Verdict.DURABLE,
                ("acme", "after"): Verdict.MISSING,
            }
        finally:
            promoted.close()
