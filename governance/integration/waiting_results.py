"""The states a waiting task shows in the result backend (DEFERRED, HELD), never over its end.

Whoever decides that a task waits (the publisher, a worker's delivery, the hold) writes that
state *after* the decision, while another process may already have handed the task on: a task
put in its tenant's wait list is handed on by the next settlement, anywhere, and a 2 ms task can
run and store its SUCCESS before the publisher that saw it wait writes DEFERRED. A plain write
then replaces the result, and the caller's ``AsyncResult`` says DEFERRED forever (seen with 50
concurrent calls of a tenant of concurrency 1). Celery's own ``store_result`` reads the state
first and skips over a SUCCESS, but between its read and its write the worker's result can land.

Here the write is conditional on the state it replaces: on Celery's Redis backend (the one this
layer ships with) a WATCH transaction on the result's key writes the waiting state only while the
task has no final state (Celery's ready states and the governance ends: DENIED, REJECTED,
SHADOWED, SUGGESTED), and says whether it wrote. Other backends get Celery's read-then-write,
with the final states checked too; the window between the two stays.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import DisabledBackend
from celery.backends.redis import RedisBackend
from redis.exceptions import WatchError

#: States no waiting state replaces: the task ended (a worker's result or a governance end).
FINAL_STATES = frozenset(states.READY_STATES) | {"DENIED", "REJECTED", "SHADOWED", "SUGGESTED"}

#: A write loses its WATCH only to a concurrent write of the same result: a few tries are plenty.
_TRIES = 8


def store_waiting_state(
    backend: Any, task_id: str, state: str, meta: dict[str, Any], request: Any = None
) -> bool:
    """Record that ``task_id`` waits (``state`` with ``meta``) unless its result already says it
    ended. Returns whether it was written (never without a result backend)."""
    if isinstance(backend, DisabledBackend):
        return False  # an app without a result backend: nothing to show anywhere
    if isinstance(backend, RedisBackend):
        return _store_on_redis(backend, task_id, state, meta, request)
    current = backend.get_task_meta(task_id, cache=False)
    if current.get("status") in FINAL_STATES:
        return False
    backend.store_result(task_id, meta, state, request=request)
    return True


def _store_on_redis(
    backend: RedisBackend, task_id: str, state: str, meta: dict[str, Any], request: Any
) -> bool:
    key = backend.get_key_for_task(task_id)
    document = backend._get_result_meta(result=meta, state=state, traceback=None, request=request)
    document["task_id"] = task_id
    value = backend.encode(document)
    expires = backend.expires
    for _ in range(_TRIES):
        with backend.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                current = pipe.get(key)
                if current is not None:
                    status = backend.decode(current).get("status")
                    if status in FINAL_STATES:
                        return False
                pipe.multi()
                if expires:
                    pipe.setex(key, expires, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)  # what Celery's own write does, for result listeners
                pipe.execute()
                return True
            except WatchError:
                continue  # the result changed meanwhile: look again
    # Written over and over by others meanwhile: whatever they wrote is fresher than "waiting".
    return False
