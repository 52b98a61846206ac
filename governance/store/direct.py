"""The hot path's Redis calls, each thread on a connection of its own: no per-command pool work.

Every governed task makes two script calls (admission, settlement), and its publisher one
transaction (the ledger record). Through redis-py's client each call also takes a connection
from the pool and gives it back (checking the process id and polling the socket for stray data
every time) and goes through the command wrappers: on this kind of machine that is about a
third of the client's CPU per call. Here each thread (and each forked process) opens its own
connection once; a call is its commands packed and written at once and their replies read, with
the same timeouts, the same retry policy (a broken connection is dropped and the call tried
again) and the same errors as the client. A server that does not know a script (restarted,
failed over) gets it with ``SCRIPT LOAD`` and the call is sent again, as ``Script`` does.

A script call can also be written now and its reply read later (:meth:`DirectCalls.send`): the
settlement of a task is written before Celery stores the task's result, and read after, so the
two round trips overlap instead of adding up. Any other call of the same thread reads the
outstanding reply first, so replies never mix.

Only for a single Redis server; a Redis Cluster client keeps redis-py's own routing.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from redis.commands.core import Script
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

T = TypeVar("T")
Args = Sequence[str | int | float]


def pack_command(connection: Any, *args: Any) -> bytes:
    """One command in the Redis protocol, as ``connection.pack_command`` writes it, in one
    ``bytes``: text in the connection's encoding, numbers as their ``repr``, and any other
    value through the connection's encoder (which refuses what redis-py refuses). Four times
    cheaper than redis-py's general packer, which splits and chunks what these calls never
    need."""
    encoder = connection.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    parts = [b"*%d\r\n" % len(args)]
    for value in args:
        kind = type(value)
        if kind is str:
            data = value.encode(encoding, errors)
        elif kind is int or kind is float:
            data = repr(value).encode()
        else:
            data = bytes(encoder.encode(value))
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class PendingReply:
    """A script call written on this thread's connection whose reply is not read yet.

    :meth:`result` must be called on the thread that sent it; a broken connection sends the
    call again (as the retry policy says), exactly as a call made at once would have.
    """

    def __init__(
        self, calls: DirectCalls, connection: Any, script: Script, keys: Sequence[str], args: Args
    ) -> None:
        self._calls, self._connection = calls, connection
        self._script, self._keys, self._args = script, keys, args
        self._read = False
        self._value: Any = None
        self._error: BaseException | None = None

    def result(self) -> Any:
        """The reply (read now if it was not yet); raises what the call raised."""
        self.collect()
        if self._error is not None:
            raise self._error
        return self._value

    def collect(self) -> None:
        """Read the reply off the connection, keeping it (or the error) for :meth:`result`."""
        if self._read:
            return
        self._read = True
        self._calls.forget(self)
        try:
            self._value = self._connection.read_response()
            return
        except (ConnectionError, TimeoutError, NoScriptError) as exc:
            # Gone with the connection, or a server that lost the script: sent again, on a new
            # connection, with the client's retries.
            if not isinstance(exc, NoScriptError):
                self._connection.disconnect()
        except Exception as exc:
            self._connection.disconnect()
            self._error = exc
            return
        try:
            self._value = self._calls.call(self._script, self._keys, self._args)
        except Exception as exc:
            self._error = exc


class DirectCalls:
    """Script calls and transactions on ``client``'s server (a ``redis.Redis``), each thread on
    a connection of its own."""

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()

    def _connection(self) -> Any:
        local = self._local
        pending: PendingReply | None = getattr(local, "pending", None)
        if pending is not None:
            pending.collect()
        pid = os.getpid()
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != pid:
            # A connection inherited through fork belongs to the parent: never write to it.
            pool = self._pool
            connection = pool.connection_class(**pool.connection_kwargs)
            local.connection, local.pid, local.pending = connection, pid, None
            self._opened.add(connection)
        return connection

    def forget(self, pending: PendingReply) -> None:
        """``pending`` is being read: later calls of this thread need not read it first."""
        if getattr(self._local, "pending", None) is pending:
            self._local.pending = None

    def call(self, script: Script, keys: Sequence[str], args: Args) -> Any:
        """``EVALSHA`` of ``script`` (``keys``, ``args``): the reply, as the client gives it."""
        connection = self._connection()
        command = [pack_command(connection, "EVALSHA", script.sha, len(keys), *keys, *args)]

        def once() -> Any:
            connection.send_packed_command(command, check_health=False)
            try:
                return connection.read_response()
            except NoScriptError:
                connection.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                connection.read_response()
                connection.send_packed_command(command, check_health=False)
                return connection.read_response()

        return self._with_retry(connection, once)

    def send(self, script: Script, keys: Sequence[str], args: Args) -> PendingReply:
        """Write ``EVALSHA`` of ``script`` now; its reply is read by ``result()`` (or by this
        thread's next call). Raises at once only if the connection cannot take the command
        even after the client's retries."""
        connection = self._connection()
        command = [pack_command(connection, "EVALSHA", script.sha, len(keys), *keys, *args)]
        self._with_retry(
            connection, lambda: connection.send_packed_command(command, check_health=False)
        )
        pending = PendingReply(self, connection, script, keys, args)
        self._local.pending = pending
        return pending

    def transaction(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """``commands`` between ``MULTI`` and ``EXEC``, written at once: their raw replies (the
        first command that failed raises its error, as a pipeline does)."""
        connection = self._connection()
        packed = [
            b"".join(pack_command(connection, *c) for c in [("MULTI",), *commands, ("EXEC",)])
        ]

        def once() -> list[Any]:
            connection.send_packed_command(packed, check_health=False)
            replies = [connection.read_response() for _ in range(len(commands) + 2)]
            results = list(replies[-1])
            for result in results:
                if isinstance(result, ResponseError):
                    raise result
            return results

        return self._with_retry(connection, once)

    @staticmethod
    def _with_retry(connection: Any, call: Callable[[], T]) -> T:
        """``call``, tried again on a new connection as the client's retry policy says; after
        any other error the connection is dropped too (its unread replies with it)."""
        try:
            result: T = connection.retry.call_with_retry(
                call, lambda _error: connection.disconnect()
            )
        except Exception:
            connection.disconnect()
            raise
        return result

    def close(self) -> None:
        """Close every connection opened here (by any thread)."""
        for connection in list(self._opened):
            connection.disconnect()
