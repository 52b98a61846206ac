"""The hot path's direct calls: per-thread connections, replies read later, and what the client
would do on a restart, a lost script or a stopped server (real Redis servers)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import redis

from governance.embedded import EmbeddedRedis
from governance.store import Period, StateStore, read_usage
from governance.store.admission import Admitter
from governance.store.connection import connect
from governance.store.direct import DirectCalls, pack_command
from governance.store.errors import StoreUnavailable
from governance.store.limits import AdmissionLimits
from tests.store.helpers import TOOL_STEP, ctx, tool

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "a" * 40, 2, "gov:{t}:leases", "gov:{t}:task:1", '{"id":"1"}', "[]"),
        ("SET", "ké", "välue", "PX", 1000),
        ("HSET", b"raw\x00key", "f", 1.5, "g", 10**20, "h", -3),
        ("SET", "k", "x" * 100_000),
    ],
)
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(command: tuple[object]) -> None:
    connection = redis.Connection()
    assert pack_command(connection, *command) == b"".join(connection.pack_command(*command))


@pytest.mark.parametrize("value", [True, None, [1], {"a": 1}])
def test_packing_refuses_what_redis_py_refuses(value: object) -> None:
    with pytest.raises(redis.DataError, match="Invalid input of type"):
        pack_command(redis.Connection(), "SET", "k", value)


def test_a_reply_read_later_is_the_calls_own_even_after_other_calls_of_the_thread(
    redis_client: redis.Redis,
) -> None:
    script = redis_client.register_script(ECHO)
    calls = DirectCalls(redis_client)
    first = calls.send(script, ["k1"], ["one"])
    # Other calls of this thread meanwhile: each reads the outstanding reply first.
    assert calls.call(script, ["k2"], ["two"]) == [b"k2", b"two"]
    assert calls.transaction([("SET", "x", "1"), ("INCR", "x")]) == [b"OK", 2]
    second = calls.send(script, ["k3"], ["three"])
    assert first.result() == [b"k1", b"one"]
    assert second.result() == [b"k3", b"three"]
    assert first.result() == [b"k1", b"one"]  # read once, kept


def test_threads_interleaving_calls_each_get_their_own_replies(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    calls = DirectCalls(redis_client)
    results: dict[int, list[bytes]] = {}

    def work(i: int) -> None:
        pending = calls.send(script, [f"k{i}"], [str(i)])
        for _ in range(50):
            calls.call(script, ["other"], ["x"])
        results[i] = pending.result()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {i: [f"k{i}".encode(), str(i).encode()] for i in range(8)}
    calls.close()


def test_a_script_the_server_lost_is_loaded_again(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    calls = DirectCalls(redis_client)
    assert calls.call(script, ["k"], ["a"]) == [b"k", b"a"]
    redis_client.script_flush()
    assert calls.call(script, ["k"], ["b"]) == [b"k", b"b"]
    redis_client.script_flush()
    assert calls.send(script, ["k"], ["c"]).result() == [b"k", b"c"]


def test_a_restarted_server_is_reconnected_to(redis_server: EmbeddedRedis) -> None:
    client = connect(redis_server.url)
    script = client.register_script(ECHO)
    calls = DirectCalls(client)
    assert calls.call(script, ["k"], ["before"]) == [b"k", b"before"]
    redis_server.restart()
    # The kept connection is dead: the call goes again on a new one (and loads the script).
    assert calls.call(script, ["k"], ["after"]) == [b"k", b"after"]
    calls.close()
    client.close()


def test_a_reply_lost_with_the_server_is_store_unavailable(redis_server: EmbeddedRedis) -> None:
    state = StateStore(connect(redis_server.url, timeout_s=0.5))
    reply = state.begin("test call", state.client.register_script(ECHO), ["k"], ["v"])
    redis_server.stop()
    with pytest.raises(StoreUnavailable, match="test call"):
        reply.result()
    with pytest.raises(StoreUnavailable, match="ledger record"):
        state.transaction("ledger record", [("SET", "x", "1")])
    state.close()


def test_a_transaction_error_leaves_the_connection_usable(redis_client: redis.Redis) -> None:
    calls = DirectCalls(redis_client)
    redis_client.set("s", "text")
    with pytest.raises(redis.ResponseError):
        calls.transaction([("INCR", "s"), ("SET", "y", "1")])
    assert calls.transaction([("SET", "z", "1"), ("GET", "z")]) == [b"OK", b"1"]


def test_a_settlement_whose_reply_is_lost_counts_once_when_sent_again(
    redis_server_factory: Callable[..., EmbeddedRedis],
) -> None:
    """The worker writes a settlement, then the server goes down before the reply is read
    (what the overlap with Celery's result write allows): the worker settles again once the
    server is back, and the attempt counts exactly once whether or not the first one ran."""
    server = redis_server_factory(appendonly=True)
    state = StateStore(connect(server.url, timeout_s=0.5))
    admitter = Admitter(state)
    limits = AdmissionLimits(concurrency=1)
    admission = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t1", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert admission.admitted
    written = admitter.begin_settle(admission.ticket, TOOL_STEP)
    server.halt()
    with pytest.raises(StoreUnavailable):
        written.result()
    server.restart()
    admitter.settle(admission.ticket, TOOL_STEP)
    usage = read_usage(state, "acme", Period.RUN, run="run-1").used
    assert (usage.steps, usage.tool_calls) == (1, 1)
    # The slot is free: the tenant's one slot admits the next task.
    nxt = admitter.admit(
        ctx=ctx(), action=tool(), task_id="t2", attempt=0, estimate=TOOL_STEP, limits=limits
    )
    assert nxt.admitted
    state.close()
