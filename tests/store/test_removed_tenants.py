"""A tenant removed from the policy while it has open tasks, at the store (single Redis and a
3-master cluster): its delivered tasks wait out a grace out of the broker, then every open task
ends with "tenant removed from the policy", audited on its own chain; nothing loops, an unknown
tenant's message writes nothing, and a tenant that comes back in time goes on.

The worker's side and govctl are in tests/e2e/test_e2e_removed_tenant.py.
"""

from __future__ import annotations

from governance.store import StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.audit import AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.keys import DeploymentKeys, TenantKeys
from governance.store.ledger import Ledger
from governance.store.limits import AdmissionLimits
from governance.store.removed import REMOVED_REASON, RemovedTenants
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool

KEY = b"removed-tenants-test"
HOUR_MS = 3_600_000


def _removed(state: StateStore) -> RemovedTenants:
    return RemovedTenants(state, AuditSealer(KEY))


def _entries(state: StateStore, tenant: str) -> list[dict[str, str]]:
    entries = AuditLog(state, AuditSealer(KEY)).entries(tenant)
    return [e.fields for e in entries if e.fields.get("type") != "seal"]


def _published(state: StateStore, tenant: str, task: str) -> None:
    Ledger(state).record_published(tenant, task, envelope(task))


def test_a_delivered_task_waits_out_the_grace_then_ends_with_the_reason(
    any_state: StateStore,
) -> None:
    removed = _removed(any_state)
    _published(any_state, "gone", "r1")
    record = TenantKeys("gone").task("r1")

    parked = removed.at_delivery("gone", "r1", HOUR_MS)
    assert parked.state == "parked"
    assert parked.until_ms is not None
    assert any_state.client.hget(record, "where") == b"parked"
    assert any_state.client.zscore(TenantKeys("gone").ledger, record) == parked.until_ms
    assert removed.at_delivery("gone", "r1", HOUR_MS).state == "parked"  # a copy: same place
    assert removed.marked() == {"gone"}
    kinds = [e["type"] for e in _entries(any_state, "gone")]
    assert kinds == ["tenant_removed", "waiting"]  # noticed once, waiting audited once

    # The grace is over (an operator ends it now): the walk marks and publishes it.
    assert removed.notice("gone", 0, by="ops") <= parked.until_ms
    walk = removed.end("gone")
    assert walk.cursor == "0"
    assert [p.task_id for p in walk.publish] == ["r1"]
    assert any_state.client.hget(record, "fail") == REMOVED_REASON.encode()

    ended = removed.at_delivery("gone", "r1", HOUR_MS)
    assert (ended.state, ended.reason) == ("ended", REMOVED_REASON)
    assert any_state.client.hget(record, "where") == b"done"
    assert any_state.client.zcard(TenantKeys("gone").ledger) == 0  # nothing left to loop
    assert removed.at_delivery("gone", "r1", HOUR_MS).state == "done"  # a late copy
    last = _entries(any_state, "gone")[-1]
    assert (last["type"], last["task_id"], last["reason"]) == (
        "authorization_denied",
        "r1",
        REMOVED_REASON,
    )
    assert [r.tenant for r in removed.removed([])] == ["gone"]
    assert removed.removed([])[0].open == 0


def test_an_unknown_tenants_message_writes_nothing(any_state: StateStore) -> None:
    """A name chosen by whoever wrote the message never becomes a key."""
    verdict = _removed(any_state).at_delivery("intruder-7", "x1", HOUR_MS)
    assert verdict.state == "unknown"
    tenant_keys = TenantKeys("intruder-7")
    for key in (*tenant_keys.shared(), tenant_keys.task("x1"), DeploymentKeys.removed_tenants):
        assert not any_state.client.exists(key), key


def test_the_end_walk_leaves_running_and_broker_tasks_to_their_deliveries(
    any_state: StateStore,
) -> None:
    """Past the deadline: a task waiting in the wait list is published to end; one whose message
    is in the broker is only marked (its delivery ends it); a running one finishes."""
    admitter, removed = Admitter(any_state), _removed(any_state)
    limits = AdmissionLimits(concurrency=1)
    for task in ("run", "wait", "queued"):
        _published(any_state, "gone", task)
    running = admitter.admit(
        ctx=ctx("gone"), action=tool(), task_id="run", attempt=0, estimate=TOOL_STEP,
        limits=limits,
    )  # fmt: skip
    assert running.admitted
    waiting = admitter.admit(
        ctx=ctx("gone"), action=tool(), task_id="wait", attempt=0, estimate=TOOL_STEP,
        limits=limits, envelope=envelope("wait"),
    )  # fmt: skip
    assert waiting.status is AdmissionStatus.WAITING

    removed.notice("gone", 0)
    walk = removed.end("gone")
    assert [p.task_id for p in walk.publish] == ["wait"]
    keys = TenantKeys("gone")
    assert any_state.client.zcard(keys.waiting) == 0
    assert any_state.client.hget(keys.task("queued"), "fail") == REMOVED_REASON.encode()
    assert any_state.client.hget(keys.task("run"), "fail") is None
    assert any_state.client.hget(keys.task("run"), "where") == b"running"
    # A second walk publishes nothing again: what it marked is on its way.
    assert removed.end("gone").publish == ()
    # The running task settles as usual and leaves the ledger.
    admitter.settle(running.ticket, TOOL_STEP)
    for task in ("wait", "queued"):
        assert removed.at_delivery("gone", task, HOUR_MS).state == "ended"
    assert any_state.client.zcard(keys.ledger) == 0


def test_a_tenant_back_in_the_policy_goes_on(any_state: StateStore) -> None:
    removed, ledger = _removed(any_state), Ledger(any_state)
    _published(any_state, "back", "b1")
    assert removed.at_delivery("back", "b1", HOUR_MS).state == "parked"
    assert ledger.sweep("back").publish == ()  # parked until the deadline

    removed.restore("back")
    assert removed.marked() == set()
    meta = any_state.client.hgetall(TenantKeys("back").meta)
    assert b"removed_deadline" not in meta
    assert [p.task_id for p in ledger.sweep("back").publish] == ["b1"]  # due now
    assert _entries(any_state, "back")[-1]["type"] == "tenant_restored"


def test_the_registry_names_known_tenants_the_policy_dropped(any_state: StateStore) -> None:
    removed = _removed(any_state)
    removed.register({"stays": 60_000, "goes": 120_000})
    _published(any_state, "goes", "g1")
    (gone,) = removed.removed(["stays"])
    assert (gone.tenant, gone.open, gone.held, gone.ends_at_ms, gone.max_wait_ms) == (
        "goes",
        1,
        0,
        None,
        120_000,
    )
    until = removed.notice("goes", 120_000)
    assert removed.removed(["stays"])[0].ends_at_ms == until
    assert removed.notice("goes", 240_000) == until  # a later notice never puts it back
    removed.unmark("goes")
    assert removed.marked() == set()
    assert removed.removed(["stays"])[0].ends_at_ms is None
    assert removed.known() == {"stays": 60_000, "goes": 120_000}  # its chain stays verifiable


def test_without_a_grace_a_delivery_ends_at_once(any_state: StateStore) -> None:
    removed = _removed(any_state)
    _published(any_state, "gone", "z1")
    verdict = removed.at_delivery("gone", "z1", 0)
    assert (verdict.state, verdict.reason) == ("ended", REMOVED_REASON)
