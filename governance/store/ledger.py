"""The ledger: where every governed task is, from its publication until it is done.

Each task has a record (a hash in its tenant's slot) and, until it is done, an entry in its
tenant's ledger index scored by when someone must look at it again. Publishers record a task
before its message goes to the broker; admission, settlement and hand-off move the record on in
the same calls that decide (see ``scripts/lib.lua``); the reconciler (:meth:`Ledger.sweep`)
publishes again whatever is overdue: a message lost between broker and worker, a parked wait
that is due, the task of a worker that died, a hand-off that never arrived. Admission is
idempotent per task and attempt, so a copy that was not lost after all is dropped, never run
twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from governance.store.admission import Publication, publications
from governance.store.audit_seal import AuditSealer, begin_sealed_call
from governance.store.keys import TenantKeys
from governance.store.state import StateStore
from governance.store.vocabulary import DISPATCH, SWEEP

#: Where a task can be, as its record says.
WHERE = ("queued", "parked", "waiting", "handed", "running", "held", "done")


@dataclass(frozen=True)
class SweepResult:
    """One tenant's reconciler round: what to publish, and whether due entries remain."""

    publish: tuple[Publication, ...]
    more: bool
    #: A run closed by this round was in flight (see ``sweep(close_run=...)``).
    closed: bool = False


@dataclass(frozen=True)
class TenantLoad:
    """What a publisher sees of its tenant when it records a task (in the same transaction):
    tasks running (live leases), published and not yet received (this one included), waiting,
    and what operators set (paused, a concurrency override in force). It says whether the task
    should wait from publication instead of entering the broker (the worker's admission decides
    exactly all the same: this only keeps work that cannot run now out of the broker)."""

    running: int
    queued: int
    waiting: int
    paused: bool = False
    concurrency_override: int | None = None

    def must_wait(self, concurrency: int | None) -> bool:
        """Whether the task waits from publication: the tenant is paused, others wait before
        it (first come, first served), or its running and queued tasks reach its concurrency."""
        limit = self.concurrency_override if self.concurrency_override is not None else concurrency
        if self.paused or self.waiting > 0:
            return True
        return limit is not None and self.running + self.queued > limit


#: A task published and not received after this long no longer counts as queued for the
#: publication's check (the reconciler publishes it again anyway).
QUEUED_HORIZON_MS = 60_000


@dataclass(frozen=True)
class DispatchResult:
    """Fair dispatch at one tenant: what it handed on, how many grants it used (in order), how
    many tasks still wait, and whether a limit of its own stopped it."""

    publish: tuple[Publication, ...]
    used: int
    left: int
    blocked: bool


@dataclass(frozen=True)
class TenantStatus:
    """What ``govctl`` shows per tenant: running and waiting tasks, the oldest wait, the
    ledger's open entries and those overdue (not looked at in time: should be none)."""

    tenant: str
    running: int
    waiting: int
    oldest_wait_ms: int | None
    open: int
    overdue: int
    #: The tenant's worker time over the last minute (ms), from its settlements.
    worker_ms_last_minute: int = 0
    #: Paused by an operator (fair dispatch).
    paused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "running": self.running,
            "waiting": self.waiting,
            "oldest_wait_s": None if self.oldest_wait_ms is None else self.oldest_wait_ms / 1000,
            "open": self.open,
            "overdue": self.overdue,
            "worker_s_last_minute": round(self.worker_ms_last_minute / 1000, 3),
            "paused": self.paused,
        }


class Ledger:
    """Records, sweeps and reports on the tasks of every tenant."""

    def __init__(self, state: StateStore, sealer: AuditSealer | None = None) -> None:
        self._state = state
        self._sealer = sealer

    def record_published(
        self,
        tenant: str,
        task_id: str,
        envelope_json: str,
        *,
        due_ms: int | None = None,
        parked: bool = False,
    ) -> TenantLoad:
        """Record a task that a publisher sends now (``queued``) or keeps for ``due_ms``
        (``parked``: the reconciler publishes it then, no broker countdown); returns what the
        publisher sees of its tenant, read in the same transaction (see :class:`TenantLoad`)."""
        keys = TenantKeys(tenant)
        record = keys.task(task_id)
        now = int(time.time() * 1000)
        due = due_ms or now
        score = due if parked else due + self._state.timings.grace_ms
        queued: list[tuple[Any, ...]] = []
        if not parked:
            queued = [
                ("ZREMRANGEBYSCORE", keys.queued, "-inf", now - QUEUED_HORIZON_MS),
                ("ZADD", keys.queued, now, record),
            ]
        replies = self._state.transaction(
            "ledger record",
            [
                (
                    "HSET",
                    record,
                    "id",
                    task_id,
                    "where",
                    "parked" if parked else "queued",
                    "since",
                    now,
                    "msg",
                    envelope_json,
                ),
                ("ZADD", keys.ledger, score, record),
                *queued,
                ("ZCOUNT", keys.leases, now, "+inf"),
                ("ZCARD", keys.queued),
                ("ZCARD", keys.waiting),
                ("HMGET", keys.meta, "ctl_paused", "ctl_concurrency", "ctl_concurrency_until"),
            ],
        )
        running, queued_n, waiting, control = replies[-4:]
        override = None
        if control[1] is not None and int(control[2] or 0) > now:
            override = int(control[1])
        return TenantLoad(
            running=int(running),
            queued=int(queued_n),
            waiting=int(waiting),
            paused=control[0] in (b"1", "1"),
            concurrency_override=override,
        )

    def mark_held(self, tenant: str, task_id: str) -> None:
        """The task waits for reviewers in the held store: not the reconciler's business."""
        keys = TenantKeys(tenant)
        record = keys.task(task_id)

        self._state.transaction(
            "ledger record",
            [
                ("HSET", record, "id", task_id, "where", "held", "since", int(time.time() * 1000)),
                ("ZREM", keys.ledger, record),
            ],
        )

    def sweep(
        self,
        tenant: str,
        *,
        reclaim: bool = True,
        close_run: tuple[str, str] | None = None,
        policy_version: str = "",
        pool_gated: bool = False,
    ) -> SweepResult:
        """One reconciler round for ``tenant`` (see ``scripts/sweep.lua``); ``close_run``
        (run, by whom) closes that run first, so its run slot goes to the waiting tasks now.
        ``policy_version``: the caller's policy; a waiting task that began to wait under another
        one is published for its own delivery to decide (see ``L.handoff``)."""
        keys = TenantKeys(tenant)
        args = SWEEP.arrange(
            {
                "close": (tenant, *close_run) if close_run else ("", "", ""),
                "policy_version": policy_version,
                "pool_gated": "1" if pool_gated else "",
            }
        )
        settings = self._state.script_settings(reclaim=reclaim)
        reply = begin_sealed_call(
            self._state,
            self._sealer,
            "ledger sweep",
            self._state.scripts.sweep,
            tenant,
            keys.shared(),
            lambda seals, writer: [*args, settings, seals, writer],
        ).result()
        return SweepResult(
            publications(reply.get("pub") or []),
            bool(reply.get("more")),
            closed=bool(reply.get("closed")),
        )

    def dispatch(
        self, tenant: str, grants: Sequence[str], *, queue: str = "", policy_version: str = ""
    ) -> DispatchResult:
        """Fair dispatch reached ``tenant``: hand its oldest waiting tasks that fit one grant
        each (see ``scripts/dispatch.lua``); the caller publishes them and gives the unused
        grants back to the pool."""
        keys = TenantKeys(tenant)
        args = DISPATCH.arrange(
            {"grants": json.dumps(list(grants)), "queue": queue, "policy_version": policy_version}
        )
        settings = self._state.script_settings()
        reply = begin_sealed_call(
            self._state,
            self._sealer,
            "fair dispatch",
            self._state.scripts.dispatch,
            tenant,
            keys.shared(),
            lambda seals, writer: [*args, settings, seals, writer],
        ).result()
        return DispatchResult(
            publications(reply.get("pub") or []),
            int(reply.get("used") or 0),
            int(reply.get("left") or 0),
            bool(reply.get("blocked")),
        )

    def waiting_tenants(self, tenants: Iterable[str]) -> list[str]:
        """The tenants with tasks in their wait lists (one pipelined read)."""
        names = list(tenants)
        if not names:
            return []

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for name in names:
                pipe.zcard(TenantKeys(name).waiting)
            return list(pipe.execute())

        counts = self._state.run("ledger read", read)
        return [name for name, count in zip(names, counts, strict=True) if int(count) > 0]

    def tenants_due(self, tenants: Iterable[str], *, waiting_too: bool) -> list[str]:
        """Tenants with ledger entries due now (and, with ``waiting_too``, with waiting tasks):
        one pipelined read for all of them."""
        names = list(tenants)
        if not names:
            return []
        now = int(time.time() * 1000)

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for name in names:
                keys = TenantKeys(name)
                pipe.zrangebyscore(keys.ledger, "-inf", now, start=0, num=1)
                pipe.zcard(keys.waiting)
            return list(pipe.execute())

        replies = self._state.run("ledger read", read)
        due = []
        for i, name in enumerate(names):
            if replies[2 * i] or (waiting_too and int(replies[2 * i + 1]) > 0):
                due.append(name)
        return due

    def status(self, tenant: str, *, overdue_after_ms: int) -> TenantStatus:
        """Counts for ``govctl status`` and the metrics (one pipelined read)."""
        keys = TenantKeys(tenant)
        now = int(time.time() * 1000)

        def read() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            pipe.zcount(keys.leases, now, "+inf")
            pipe.zcard(keys.waiting)
            pipe.zrange(keys.waiting, 0, 0)
            pipe.zcard(keys.ledger)
            pipe.zcount(keys.ledger, "-inf", now - overdue_after_ms)
            pipe.hmget(keys.meta, f"busy:{minute}", f"busy:{minute - 1}", "ctl_paused")
            return list(pipe.execute())

        minute, into = divmod(now, 60_000)
        running, waiting, head, open_, overdue, meta = self._state.run("ledger read", read)
        this_minute, last_minute, paused = (int(v) if v is not None else 0 for v in meta)
        # The last 60 s: this minute so far, and the part of the previous one still in them.
        worker_ms = this_minute + round(last_minute * (60_000 - into) / 60_000)
        oldest = None
        if head:
            since = self._state.run(
                "ledger read", lambda: self._state.client.hget(head[0], "wait_since")
            )
            if since is not None:
                oldest = max(0, now - int(since))
        return TenantStatus(
            tenant,
            int(running),
            int(waiting),
            oldest,
            int(open_),
            int(overdue),
            worker_ms_last_minute=worker_ms,
            paused=paused == 1,
        )

    def overdue(
        self, tenant: str, *, overdue_after_ms: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Tasks nobody looked at in time: neither done nor accounted for (should be none)."""
        keys = TenantKeys(tenant)
        now = int(time.time() * 1000)

        def read() -> list[dict[str, Any]]:
            members = self._state.client.zrangebyscore(
                keys.ledger, "-inf", now - overdue_after_ms, start=0, num=limit, withscores=True
            )
            pipe = self._state.client.pipeline(transaction=False)
            for member, _ in members:
                pipe.hmget(member, "id", "where", "since")
            rows = []
            for (_member, score), (task_id, where, since) in zip(
                members, pipe.execute(), strict=True
            ):
                rows.append(
                    {
                        "task_id": _text(task_id or b""),
                        "where": _text(where or b"?"),
                        "since_ms": int(since) if since else None,
                        "due_ms": int(score),
                    }
                )
            return rows

        return self._state.run("ledger read", read)

    def republished(self, tenant: str) -> int:
        """How many tasks of ``tenant`` the reconciler published again, in all."""
        key = TenantKeys(tenant).meta
        count = self._state.run("ledger read", lambda: self._state.client.hget(key, "republished"))
        return int(count or 0)

    def where(self, tenant: str, task_id: str) -> dict[str, str]:
        """A task's record (for tests and ``govctl``)."""
        key = TenantKeys(tenant).task(task_id)
        raw = self._state.run("ledger read", lambda: self._state.client.hgetall(key))
        return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
