"""The held store: approval-tier tasks wait here for reviewers, in Redis, never in the broker.

A hash per task keeps the whole call (task name, arguments, context, action, the message to
publish) with its status and the reviewers' signed decisions; per-tenant sorted sets index it by
status and request time (paginated listing in O(page)) and by expiry. Every transition is one
Lua script that also writes its audit entry and moves the task's ledger record, so a decision
and its record are one. Redis state is not what releases a task, though: the worker verifies the
reviewers' signatures that the released message carries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governance.store.audit_seal import AuditSealer, begin_sealed_call
from governance.store.keys import TenantKeys
from governance.store.state import StateStore
from governance.store.vocabulary import GRANT_REVOKE, HELD_DECIDE, HELD_PUT, template_values


class HeldStatus(StrEnum):
    HELD = "held"  # waiting for reviewers; blocks the action
    SUGGESTED = "suggested"  # a non-blocking suggestion: listed, never run
    RELEASED = "released"  # approved by the quorum and published again
    REJECTED = "rejected"
    EXPIRED = "expired"


STATUS_ORDER = tuple(HeldStatus)


@dataclass(frozen=True)
class HeldDecision:
    verdict: str
    reviewer: str
    reason: str
    at_ms: int
    signed: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class HeldTask:
    """One held or suggested task, as stored."""

    task_id: str
    tenant: str
    agent: str
    run: str
    user: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    context: dict[str, Any]
    action: dict[str, Any]
    action_name: str
    action_class: str
    tier: str
    reason: str
    call: str
    requested_ms: int
    expires_ms: int
    envelope: dict[str, Any]
    status: HeldStatus = HeldStatus.HELD
    kind: str = "hold"
    approvals: int = 0
    decisions: tuple[HeldDecision, ...] = field(default=())
    reheld: int = 0

    @property
    def blocking(self) -> bool:
        return self.status is not HeldStatus.SUGGESTED

    def signed_approvals(self) -> list[Mapping[str, Any]]:
        """The signed approve decisions recorded so far."""
        return [d.signed for d in self.decisions if d.verdict == "approve" and d.signed]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``govctl held show --json``)."""
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "agent": self.agent,
            "run": self.run,
            "user": self.user,
            "task_name": self.task_name,
            "args": self.args,
            "kwargs": self.kwargs,
            "context": self.context,
            "action": self.action,
            "action_name": self.action_name,
            "action_class": self.action_class,
            "tier": self.tier,
            "kind": self.kind,
            "reason": self.reason,
            "call": self.call,
            "requested_ms": self.requested_ms,
            "expires_ms": self.expires_ms,
            "status": self.status.value,
            "blocking": self.blocking,
            "approvals": self.approvals,
            "decisions": [
                {
                    "verdict": d.verdict,
                    "reviewer": d.reviewer,
                    "reason": d.reason,
                    "at_ms": d.at_ms,
                    "signed": d.signed is not None,
                    "grant_s": (d.signed or {}).get("payload", {}).get("grant_s"),
                }
                for d in self.decisions
            ],
            "reheld": self.reheld,
        }


@dataclass(frozen=True)
class Decided:
    """What a decision did: ``outcome`` is released, recorded, rejected, expired, unknown,
    not_held, already_approved, not_due or stale; ``status`` is the task's status afterwards."""

    outcome: str
    status: str
    approvals: int


@dataclass(frozen=True)
class HeldPage:
    tasks: list[HeldTask]
    next_cursor: str | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class HeldStore:
    """Held tasks of every tenant in one Redis (or Redis Cluster)."""

    def __init__(self, state: StateStore, sealer: AuditSealer | None = None) -> None:
        self._state = state
        self._sealer = sealer

    def _status_keys(self, keys: TenantKeys) -> list[str]:
        return [keys.held_by_status(s.value) for s in STATUS_ORDER]

    def _call(
        self,
        operation: str,
        script: Any,
        tenant: str,
        keys: list[str],
        args: Sequence[Any],
        audit: Mapping[str, str],
    ) -> Any:
        """Run a held-store script that writes audit entries (with the template ``audit``):
        seals go with it."""
        return begin_sealed_call(
            self._state,
            self._sealer,
            operation,
            script,
            tenant,
            keys,
            lambda seals, writer: [*args, seals, writer],
            template=audit,
        ).result()

    def put(
        self,
        task: HeldTask,
        *,
        audit: Mapping[str, str],
        detail: Mapping[str, Any] | None = None,
        notification: Mapping[str, Any] | None = None,
    ) -> str:
        """Store ``task`` (status held or suggested) with its audit entry and notification;
        returns created, waiting (it already was), reheld, or ended (the task ended: a copy
        of it is dropped, never held again; audited as ``release_replayed``)."""
        keys = TenantKeys(task.tenant)
        record = {
            "task_id": task.task_id,
            "tenant": task.tenant,
            "agent": task.agent,
            "run": task.run,
            "user": task.user,
            "task_name": task.task_name,
            "args": json.dumps(task.args),
            "kwargs": json.dumps(task.kwargs),
            "context": json.dumps(task.context),
            "action": json.dumps(task.action),
            "action_name": task.action_name,
            "action_class": task.action_class,
            "tier": task.tier,
            "kind": task.kind,
            "reason": task.reason,
            "call": task.call,
            "envelope": json.dumps(task.envelope),
        }
        args = HELD_PUT.arrange(
            {
                "id": task.task_id,
                "status": task.status.value,
                "requested_ms": task.requested_ms,
                "expires_ms": task.expires_ms,
                "task": json.dumps(record),
                "au": template_values(audit),
                "reason": task.reason,
                "detail": json.dumps(dict(detail or {"expires_ms": task.expires_ms})),
                "notify": json.dumps(notification) if notification else "",
                "ttl": self._state.ttl.task_s,
            }
        )
        script_keys = [
            *keys.shared(),
            keys.held(task.task_id),
            *self._status_keys(keys),
            keys.held_expiry,
            keys.task(task.task_id),
            keys.outbox,
            keys.notifications,
        ]
        reply = self._call(
            "hold", self._state.scripts.held_put, task.tenant, script_keys, args, audit
        )
        return str(reply["outcome"])

    def get(self, tenant: str, task_id: str) -> HeldTask | None:
        raw = self._state.run(
            "held read", lambda: self._state.client.hgetall(TenantKeys(tenant).held(task_id))
        )
        return _parse(raw) if raw else None

    def find(self, task_id: str, tenants: Iterable[str]) -> HeldTask | None:
        """The held task with this id, looked up in each of ``tenants`` (one pipelined read)."""
        names = list(tenants)

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for tenant in names:
                pipe.hgetall(TenantKeys(tenant).held(task_id))
            return list(pipe.execute())

        for raw in self._state.run("held read", read) if names else []:
            if raw:
                return _parse(raw)
        return None

    def page(
        self,
        tenant: str,
        status: HeldStatus,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> HeldPage:
        """Up to ``limit`` tasks of one tenant and status, oldest first, after ``cursor``.

        Reads only the page: a range of the status index, then those hashes, in one pipeline.
        """
        keys = TenantKeys(tenant)
        index = keys.held_by_status(status.value)
        client = self._state.client

        def read() -> list[tuple[bytes, float]]:
            first = 0
            if cursor is not None:
                score, member = cursor.split(":", 1)
                rank = client.zrank(index, member)
                # The cursor's task may have left this status since: continue by its score.
                first = rank + 1 if rank is not None else client.zcount(index, "-inf", f"({score}")
            return list(client.zrange(index, first, first + limit, withscores=True))

        rows = self._state.run("held list", read)
        more = len(rows) > limit
        rows = rows[:limit]

        def fetch() -> list[dict[bytes, bytes]]:
            pipe = self._state.client.pipeline(transaction=False)
            for member, _ in rows:
                pipe.hgetall(keys.held(_text(member)))
            return list(pipe.execute())

        records = self._state.run("held list", fetch) if rows else []
        tasks = [_parse(r) for r in records if r]
        next_cursor = f"{int(rows[-1][1])}:{_text(rows[-1][0])}" if more and rows else None
        return HeldPage(tasks, next_cursor)

    def count(self, tenant: str, status: HeldStatus) -> int:
        key = TenantKeys(tenant).held_by_status(status.value)
        return int(self._state.run("held count", lambda: self._state.client.zcard(key)))

    def decide(
        self,
        task: HeldTask,
        *,
        verdict: str,
        reviewer: str,
        reason: str,
        quorum: int = 1,
        signed: Mapping[str, Any] | None = None,
        seen: int = 0,
        release: str | None = None,
        grant: Mapping[str, Any] | None = None,
        audit: Mapping[str, str],
        ttl_s: int,
        now_ms: int | None = None,
    ) -> Decided:
        """Record an approval, a rejection or an expiry atomically (see held_decide.lua)."""
        keys = TenantKeys(task.tenant)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        args = HELD_DECIDE.arrange(
            {
                "id": task.task_id,
                "verdict": verdict,
                "reviewer": reviewer,
                "reason": reason,
                "now": now,
                "quorum": quorum,
                "signed": json.dumps(dict(signed)) if signed else "",
                "seen": seen,
                "release": release or "",
                "grant_id": grant["id"] if grant else "",
                "grant_json": grant["json"] if grant else "",
                "grant_until_ms": grant.get("until_ms") or "" if grant else "",
                "au": template_values(audit),
                "ttl": ttl_s,
            }
        )
        script_keys = [
            *keys.shared(),
            keys.held(task.task_id),
            *self._status_keys(keys),
            keys.held_expiry,
            keys.task(task.task_id),
            keys.grants,
        ]
        reply = self._call(
            "held decision",
            self._state.scripts.held_decide,
            task.tenant,
            script_keys,
            [*args, self._state.script_settings()],
            audit,
        )
        return Decided(str(reply["outcome"]), str(reply["status"]), int(reply["approvals"]))

    def grants(self, tenant: str) -> dict[str, dict[str, Any]]:
        """The tenant's stored grants, by id (not verified: the worker verifies each)."""
        key = TenantKeys(tenant).grants
        raw = self._state.run("grants", lambda: self._state.client.hgetall(key))
        grants = {}
        for grant_id, value in raw.items():
            try:
                grants[_text(grant_id)] = json.loads(value)
            except ValueError:
                continue  # not ours; never valid anyway
        return grants

    def revoke_grant(self, tenant: str, grant_id: str, audit: Mapping[str, str]) -> bool:
        keys = TenantKeys(tenant)
        args = GRANT_REVOKE.arrange({"id": grant_id, "au": template_values(audit)})
        reply = self._call(
            "grant revoke",
            self._state.scripts.grant_revoke,
            tenant,
            [*keys.shared(), keys.grants],
            args,
            audit,
        )
        return int(reply["removed"]) == 1

    def held_ids(self, tenant: str, limit: int = 500) -> list[str]:
        """The ids of ``tenant``'s tasks still held (at most ``limit``), soonest expiry first."""
        key = TenantKeys(tenant).held_expiry

        def read() -> list[bytes]:
            return list(self._state.client.zrange(key, 0, limit - 1))

        return [_text(i) for i in self._state.run("held expiry", read)]

    def due_for_expiry(self, tenant: str, now_ms: int | None = None, limit: int = 500) -> list[str]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        key = TenantKeys(tenant).held_expiry

        def read() -> list[bytes]:
            return list(self._state.client.zrangebyscore(key, "-inf", now, start=0, num=limit))

        return [_text(i) for i in self._state.run("held expiry", read)]


def _decision(d: Mapping[str, Any]) -> HeldDecision:
    signed = d.get("signed")
    return HeldDecision(
        verdict=str(d.get("verdict", "")),
        reviewer=str(d.get("reviewer", "")),
        reason=str(d.get("reason", "")),
        at_ms=int(d.get("at_ms", 0)),
        signed=signed if isinstance(signed, Mapping) else None,
    )


def _parse(raw: Mapping[bytes, bytes]) -> HeldTask:
    f = {_text(k): _text(v) for k, v in raw.items()}
    decisions: Sequence[Mapping[str, Any]] = json.loads(f.get("decisions", "[]") or "[]")
    return HeldTask(
        task_id=f["task_id"],
        tenant=f["tenant"],
        agent=f.get("agent", ""),
        run=f.get("run", ""),
        user=f.get("user", ""),
        task_name=f["task_name"],
        args=json.loads(f.get("args", "[]")),
        kwargs=json.loads(f.get("kwargs", "{}")),
        context=json.loads(f.get("context", "{}") or "{}"),
        action=json.loads(f.get("action", "{}")),
        action_name=f.get("action_name", ""),
        action_class=f.get("action_class", ""),
        tier=f.get("tier", ""),
        reason=f.get("reason", ""),
        call=f.get("call", ""),
        requested_ms=int(f.get("requested_ms", "0")),
        expires_ms=int(f.get("expires_ms", "0")),
        envelope=json.loads(f.get("envelope", "{}") or "{}"),
        status=HeldStatus(f["status"]),
        kind=f.get("kind", "hold"),
        approvals=int(f.get("approvals", "0")),
        decisions=tuple(_decision(d) for d in decisions if isinstance(d, Mapping)),
        reheld=int(f.get("reheld", "0")),
    )
