"""The audit stream's hash chain: appends from many writers, and tampering detected by name."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from governance.store import AuditEvent, AuditEventType, AuditLog, StateStore
from governance.store.keys import DeploymentKeys

KEY = b"test-audit-key"


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.ADMITTED,
        tenant="acme",
        agent="bot",
        run="run-1",
        task_id=f"t{i}",
        action="echo",
        decision="allow",
        tier="act_auto",
        policy_version="v1",
        detail={"i": i},
    )


def _fill(state: StateStore, n: int) -> list[str]:
    log = AuditLog(state, KEY)
    ids: list[str] = []
    for i in range(n):
        ids += log.append(_event(i))
    return ids


def test_chain_of_concurrent_writers_verifies(state: StateStore) -> None:
    def writer(w: int) -> None:
        log = AuditLog(state, KEY)  # each writer has its own view of the head
        for i in range(50):
            log.append(_event(w * 1000 + i), _event(w * 1000 + i + 500))

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(writer, range(6)))
    report = AuditLog(state, KEY).verify()
    assert report.ok, report.reason
    assert report.checked == 6 * 50 * 2


def test_wrong_key_fails_verification(state: StateStore) -> None:
    _fill(state, 3)
    report = AuditLog(state, b"another-key").verify()
    assert not report.ok
    assert "altered" in report.reason


def test_an_altered_field_is_named(state: StateStore, redis_client: redis.Redis) -> None:
    ids = _fill(state, 5)
    target = ids[2]
    entries = redis_client.xrange(DeploymentKeys.audit_stream)
    redis_client.delete(DeploymentKeys.audit_stream)
    for entry_id, fields in entries:
        if entry_id.decode() == target:
            fields[b"decision"] = b"deny"
        redis_client.xadd(DeploymentKeys.audit_stream, fields, id=entry_id)
    report = AuditLog(state, KEY).verify()
    assert not report.ok
    assert report.broken_entry == target
    assert report.checked == 2
    assert f"entry {target}" in report.reason
    assert "altered" in report.reason


def test_an_entry_deleted_in_the_middle_is_named(
    state: StateStore, redis_client: redis.Redis
) -> None:
    ids = _fill(state, 5)
    redis_client.xdel(DeploymentKeys.audit_stream, ids[2])
    report = AuditLog(state, KEY).verify()
    assert not report.ok
    assert report.broken_entry == ids[3]
    assert "removed" in report.reason


def test_entries_removed_from_the_end_are_detected(
    state: StateStore, redis_client: redis.Redis
) -> None:
    ids = _fill(state, 4)
    redis_client.xdel(DeploymentKeys.audit_stream, ids[-1])
    report = AuditLog(state, KEY).verify()
    assert not report.ok
    assert "head" in report.reason


def test_tail_returns_newest_entries_in_order(state: StateStore) -> None:
    _fill(state, 10)
    tail = AuditLog(state, KEY).tail(3)
    assert [e.fields["task_id"] for e in tail] == ["t7", "t8", "t9"]
    assert all(e.fields["type"] == "admitted" for e in tail)


def test_audit_append_works_on_a_cluster(redis_cluster_client: object) -> None:
    state = StateStore(redis_cluster_client)
    log = AuditLog(state, KEY)
    log.append(_event(1), _event(2))
    log.append(_event(3))
    assert log.verify().ok
