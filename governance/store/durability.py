"""Confirming that the records of tasks that live only in the state Redis are durable.

A task that waits, is parked or held (or is accepted while the broker is down) has left the
broker: its ledger record is all there is of it. With the AOF fsynced once a second, a crash
of the state Redis may lose the last second of writes, and a failover what the promoted replica
had not received: a record lost then is a task nobody will ever run. Before such a task's
broker message is acknowledged (or its publisher returns), a confirmation asks the server that
holds its record now:

1. whether the record is there, with what it takes to publish the task again (its message, or
   the held store's copy, or it has ended): ``HMGET`` of the record;
2. then writes a counter of its own (``TenantKeys.barrier``), and waits, on the same
   connection, for ``WAITAOF 1 0`` (that write, and so everything before it on that server, is
   in the server's AOF on disk) and, with replicas asked for, ``WAIT N`` (N replicas received
   it).

A record found there is in that server's history before the counter's write, so both waits
cover it: **durable**. A record not found (the write went to a server that died before it was
on disk, or to a primary whose replica was promoted without it) is **missing**: its delivery is
given back to the broker, or its publisher told it was not accepted. No confirmation in time
(no replica answered) is **unconfirmed**: tried again. The record may be older than the last
write of the task (its move to the wait list lost, say): any state a record can be in is one the
reconciler moves on from (a ``queued`` record is published again), so a found record is enough.

One confirmation serves a whole batch: every task of the batch on one server costs one read,
and the batch one counter write, one ``WAITAOF`` and one ``WAIT``, per server (per node of a
Redis Cluster). A server without ``WAITAOF`` (Redis before 7.2) or without an AOF confirms what
it can (the record, ``WAIT``): it is said once in the log, and the docs say what it loses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from governance.store.errors import StoreUnavailable
from governance.store.keys import TenantKeys
from governance.store.state import StateStore

log = logging.getLogger("governance.durability")

#: Where a record may be without a message of its own and still be published or ended.
_WITHOUT_MESSAGE = (b"held", b"done")


class Verdict(Enum):
    """What a confirmation found of one task."""

    #: Its record is there, and on disk (and on the replicas asked for).
    DURABLE = "durable"
    #: Its record is not there (lost with a crash or a failover): re-decide it, or refuse it.
    MISSING = "missing"
    #: Not confirmed in time (a replica did not answer, the server did not): try again.
    UNCONFIRMED = "unconfirmed"


@dataclass(frozen=True)
class DurabilityRule:
    """What a record needs: the primary's AOF fsynced (``local``), and ``replicas`` replicas
    that received it; ``timeout_ms``: the longest one confirmation waits for them."""

    local: bool = True
    replicas: int = 0
    timeout_ms: int = 1000


@dataclass
class Round:
    """The verdicts of one confirmation, per (tenant, task id); ``problems``: why some were not
    confirmed."""

    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class NotDurable(StoreUnavailable):
    """A task that would live only in the state Redis was not confirmed durable
    (``GOVERNANCE_STATE_DURABILITY``): its publisher is not told it was accepted."""

    def __init__(self, task_id: str, reason: str, recorded: bool) -> None:
        if recorded:
            text = (
                f"task {task_id} is recorded in the state Redis but was not confirmed durable "
                f"({reason}): a crash or a failover may still lose it, or it may run; do not "
                "publish it again under another id"
            )
        else:
            text = (
                f"task {task_id} was not accepted: its record is not on the state Redis's "
                f"primary ({reason}); publish it again"
            )
        RuntimeError.__init__(self, text)
        self.operation = "durability confirmation"
        self.cause = RuntimeError(reason)
        self.task_id, self.reason, self.recorded = task_id, reason, recorded

    def __reduce__(self) -> Any:
        return (type(self), (self.task_id, self.reason, self.recorded))


class Durability:
    """Confirms batches of task records on ``state``'s servers (see the module doc)."""

    def __init__(self, state: StateStore, rule: DurabilityRule) -> None:
        self.state = state
        self.rule = rule
        #: What a server lacked (WAITAOF, an AOF), said once: then not asked again.
        self._without_waitaof: str | None = None

    def confirm(self, items: Iterable[tuple[str, str]]) -> Round:
        """One confirmation of ``items`` ((tenant, task id) pairs), one batch per server.
        Raises :class:`StoreUnavailable` when a server cannot be reached."""
        by_server: dict[Any, tuple[Any, dict[str, list[str]]]] = {}
        for tenant, task_id in items:
            client, name = self._server_of(tenant)
            tenants = by_server.setdefault(name, (client, {}))[1]
            ids = tenants.setdefault(tenant, [])
            if task_id not in ids:
                ids.append(task_id)
        result = Round()
        for client, tenants in by_server.values():
            self.state.run("durability confirmation", partial(self._on, client, tenants, result))
        return result

    def _server_of(self, tenant: str) -> tuple[Any, Any]:
        """The client of the server holding ``tenant``'s keys, and a name for that server."""
        client = self.state.client
        if isinstance(client, redis.Redis):
            return client, None
        node = client.get_node_from_key(TenantKeys(tenant).barrier)
        return client.get_redis_connection(node), node.name

    def _on(self, client: Any, tenants: dict[str, list[str]], result: Round) -> None:
        """Confirm ``tenants``' tasks on one server, in one pipeline on one connection."""
        rule = self.rule
        pipe = client.pipeline(transaction=False)
        asked: list[tuple[str, str]] = []
        for tenant, ids in tenants.items():
            keys = TenantKeys(tenant)
            for task_id in ids:
                pipe.hmget(keys.task(task_id), "where", "msg")
                asked.append((tenant, task_id))
        pipe.incr(TenantKeys(next(iter(tenants))).barrier)
        local = rule.local and self._without_waitaof is None
        if local:
            pipe.execute_command("WAITAOF", 1, 0, rule.timeout_ms)
        if rule.replicas:
            pipe.execute_command("WAIT", rule.replicas, rule.timeout_ms)
        replies = pipe.execute(raise_on_error=False)
        for reply in replies[: len(asked) + 1]:
            if isinstance(reply, Exception):
                raise reply
        waits = replies[len(asked) + 1 :]
        confirmed = True
        if local:
            reply, waits = waits[0], waits[1:]
            if isinstance(reply, ResponseError) and _lacks_waitaof(reply):
                self._degrade(str(reply))
            elif isinstance(reply, Exception):
                raise reply
            elif int(reply[0]) < 1:
                confirmed = False
                result.problems.append(
                    f"the primary's AOF was not fsynced within {rule.timeout_ms} ms"
                )
        if rule.replicas:
            reply = waits[0]
            if isinstance(reply, Exception):
                raise reply
            if int(reply) < rule.replicas:
                confirmed = False
                result.problems.append(
                    f"{int(reply)} of {rule.replicas} replica(s) received it within "
                    f"{rule.timeout_ms} ms"
                )
        for key, (where, msg) in zip(asked, replies[: len(asked)], strict=True):
            if where is None or (msg is None and where not in _WITHOUT_MESSAGE):
                result.verdicts[key] = Verdict.MISSING
            else:
                result.verdicts[key] = Verdict.DURABLE if confirmed else Verdict.UNCONFIRMED

    def _degrade(self, reply: str) -> None:
        """The server cannot confirm the primary's disk: said once, then not asked again."""
        if "appendonly" in reply.lower():
            lacks = "the state Redis runs without an AOF (appendonly no): nothing it holds "
            lacks += "survives its restart"
        else:
            lacks = "the state Redis has no WAITAOF (it needs Redis 7.2+ or Valkey)"
        self._without_waitaof = lacks
        also = (
            f"only that {self.rule.replicas} replica(s) received it (WAIT)"
            if self.rule.replicas
            else "only that its record is there"
        )
        log.warning(
            "GOVERNANCE_STATE_DURABILITY: %s; a task that lives only in it is confirmed %s, "
            "not that it is on the primary's disk: a crash of the state Redis may lose its "
            "last second of writes (%s)",
            lacks,
            also,
            reply,
        )


def _lacks_waitaof(error: ResponseError) -> bool:
    text = str(error).lower()
    return "unknown command" in text or "appendonly" in text


def confirm_all(
    durability: Durability, items: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Verdict]:
    """One confirmation of ``items``; every one unconfirmed when the store cannot answer."""
    try:
        return durability.confirm(items).verdicts
    except (StoreUnavailable, RedisError):
        return dict.fromkeys(items, Verdict.UNCONFIRMED)
