"""The held store: approval-tier tasks wait here for reviewers, in Redis, never in the broker.

A hash per task keeps the whole call (task name, arguments, headers, context, action) with its
status and decisions; per-tenant sorted sets index it by status and request time (for paginated
listing in O(page)) and by expiry. Every transition is one Lua script, so exactly one reviewer
can release a task, and a release token is spent at most once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governance.store.keys import DeploymentKeys, TenantKeys
from governance.store.state import StateStore


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
    headers: dict[str, Any]
    action: dict[str, Any]
    action_name: str
    action_class: str
    tier: str
    reason: str
    args_hash: str
    requested_ms: int
    expires_ms: int
    status: HeldStatus = HeldStatus.HELD
    approvals: int = 0
    decisions: tuple[HeldDecision, ...] = field(default=())
    published: bool = True
    reheld: int = 0
    envelope: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> bool:
        return self.status is not HeldStatus.SUGGESTED

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
            "action": self.action,
            "action_name": self.action_name,
            "action_class": self.action_class,
            "tier": self.tier,
            "reason": self.reason,
            "args_hash": self.args_hash,
            "requested_ms": self.requested_ms,
            "expires_ms": self.expires_ms,
            "status": self.status.value,
            "blocking": self.blocking,
            "approvals": self.approvals,
            "decisions": [d.__dict__ for d in self.decisions],
            "reheld": self.reheld,
        }


def call_hash(task_name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """The hash a release is bound to: the exact task and arguments."""
    canonical = json.dumps(
        {"task": task_name, "args": args, "kwargs": kwargs}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Decided:
    """What a decision did: ``outcome`` is released, recorded, rejected, expired, unknown,
    not_held, already_approved or not_due; ``status`` is the task's status afterwards."""

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

    def __init__(self, state: StateStore) -> None:
        self._state = state

    def _status_keys(self, keys: TenantKeys) -> list[str]:
        return [keys.held_by_status(s.value) for s in STATUS_ORDER]

    def put(self, task: HeldTask) -> str:
        """Store ``task`` (status held or suggested); returns created, waiting or reheld."""
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
            "headers": json.dumps(task.headers),
            "action": json.dumps(task.action),
            "action_name": task.action_name,
            "action_class": task.action_class,
            "tier": task.tier,
            "reason": task.reason,
            "args_hash": task.args_hash,
            "envelope": json.dumps(task.envelope),
        }
        argv: list[str | int] = [
            task.task_id,
            task.status.value,
            task.requested_ms,
            task.expires_ms,
        ]
        for name, value in record.items():
            argv += [name, value]
        script_keys = [keys.held(task.task_id), *self._status_keys(keys), keys.held_expiry]
        reply = self._state.call("hold", self._state.scripts.held_put, script_keys, argv)

        def remember_tenant() -> None:
            self._state.client.sadd(DeploymentKeys.held_tenants, task.tenant)

        self._state.run("hold", remember_tenant)
        return _text(reply[0])

    def get(self, tenant: str, task_id: str) -> HeldTask | None:
        raw = self._state.run(
            "held read", lambda: self._state.client.hgetall(TenantKeys(tenant).held(task_id))
        )
        return _parse(raw) if raw else None

    def find(self, task_id: str, tenants: list[str]) -> HeldTask | None:
        """The held task with this id, looked up in each of ``tenants``."""
        for tenant in self.tenants(tenants):
            task = self.get(tenant, task_id)
            if task is not None:
                return task
        return None

    def tenants(self, known: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Tenants that ever held a task, plus ``known`` ones, sorted."""
        recorded = self._state.run(
            "held tenants", lambda: self._state.client.smembers(DeploymentKeys.held_tenants)
        )
        return sorted(set(known) | {_text(t) for t in recorded})

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
        tenant: str,
        task_id: str,
        *,
        verdict: str,
        reviewer: str,
        reason: str,
        quorum: int = 1,
        release_token_hash: str = "",
        now_ms: int | None = None,
    ) -> Decided:
        """Record an approval, a rejection or an expiry atomically (see held_decide.lua)."""
        keys = TenantKeys(tenant)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        argv: list[str | int] = [
            task_id,
            verdict,
            reviewer,
            reason,
            now,
            quorum,
            release_token_hash,
        ]
        script_keys = [
            keys.held(task_id),
            *self._status_keys(keys),
            keys.held_expiry,
            keys.held_unpublished,
        ]
        reply = self._state.call(
            "held decision", self._state.scripts.held_decide, script_keys, argv
        )
        return Decided(_text(reply[0]), _text(reply[1]), int(reply[2]))

    def consume_release(self, tenant: str, task_id: str, token: str) -> bool:
        """Spend a release token: True exactly once, for the token of the current release."""
        keys = [TenantKeys(tenant).held(task_id)]
        reply = self._state.call(
            "release token", self._state.scripts.release_consume, keys, [token_hash(token)]
        )
        return int(reply) == 1

    def save_grant(self, tenant: str, grant_id: str, grant_json: str) -> None:
        key = TenantKeys(tenant).grants
        self._state.run("grant", lambda: self._state.client.hset(key, grant_id, grant_json))

    def grants(self, tenant: str) -> list[str]:
        key = TenantKeys(tenant).grants
        return [_text(v) for v in self._state.run("grants", lambda: self._state.client.hvals(key))]

    def due_for_expiry(self, tenant: str, now_ms: int | None = None, limit: int = 500) -> list[str]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        key = TenantKeys(tenant).held_expiry

        def read() -> list[bytes]:
            return list(self._state.client.zrangebyscore(key, "-inf", now, start=0, num=limit))

        return [_text(i) for i in self._state.run("held expiry", read)]


def _parse(raw: dict[bytes, bytes]) -> HeldTask:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return HeldTask(
        task_id=f["task_id"],
        tenant=f["tenant"],
        agent=f.get("agent", ""),
        run=f.get("run", ""),
        user=f.get("user", ""),
        task_name=f["task_name"],
        args=json.loads(f.get("args", "[]")),
        kwargs=json.loads(f.get("kwargs", "{}")),
        headers=json.loads(f.get("headers", "{}")),
        action=json.loads(f.get("action", "{}")),
        action_name=f.get("action_name", ""),
        action_class=f.get("action_class", ""),
        tier=f.get("tier", ""),
        reason=f.get("reason", ""),
        args_hash=f.get("args_hash", ""),
        requested_ms=int(f.get("requested_ms", "0")),
        expires_ms=int(f.get("expires_ms", "0")),
        status=HeldStatus(f["status"]),
        approvals=int(f.get("approvals", "0")),
        decisions=tuple(HeldDecision(**d) for d in json.loads(f.get("decisions", "[]") or "[]")),
        published=f.get("published", "1") == "1",
        reheld=int(f.get("reheld", "0")),
        envelope=json.loads(f.get("envelope", "{}") or "{}"),
    )
