"""Store fixtures: a StateStore on the session Redis, and one per topology (single, cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from governance.store import StateStore
from governance.store.admission import Admitter


@pytest.fixture
def state(redis_client: redis.Redis) -> Iterator[StateStore]:
    """A StateStore on the (flushed) session Redis, with short leases."""
    return StateStore(redis_client, lease_ms=5_000)


@pytest.fixture(params=["single", "cluster"])
def any_state(request: pytest.FixtureRequest) -> Iterator[StateStore]:
    """The same StateStore on a single Redis and on a 3-master Redis Cluster."""
    if request.param == "single":
        client = request.getfixturevalue("redis_client")
    else:
        client = request.getfixturevalue("redis_cluster_client")
    return StateStore(client, lease_ms=5_000)


@pytest.fixture
def admitter(state: StateStore) -> Admitter:
    return Admitter(state)
