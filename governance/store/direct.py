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

Only for a single Redis server (or the primary Sentinels name: a connection asks them where it
is when it connects); a Redis Cluster client keeps redis-py's own routing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from redis.commands.core import Script
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError
from redis.sentinel import SentinelConnectionPool

from governance import forksafe
from governance.store.pending import Pending

T = TypeVar("T")
Args = Sequence["str | int | float | Packed"]


class Packed:
    """Arguments that many calls share (a tenant's limits, the store's settings), packed in the
    Redis protocol once per encoding and spliced into each command as they are."""

    __slots__ = ("_last", "_packed", "values")

    def __init__(self, values: Sequence[str | int | float]) -> None:
        self.values: tuple[str | int | float, ...] = tuple(values)
        self._packed: dict[tuple[str, str], bytes] = {}
        #: The encoder it was last packed for, and what for: one read, one write (threads).
        self._last: tuple[Any, bytes] = (None, b"")

    def __len__(self) -> int:
        return len(self.values)

    def packed(self, encoder: Any) -> bytes:
        """The arguments as ``pack_command`` writes them, for ``encoder``'s encoding."""
        last = self._last
        if last[0] is encoder:  # the same connection's encoder as last time
            return last[1]
        key = (encoder.encoding, encoder.encoding_errors)
        data = self._packed.get(key)
        if data is None:
            parts: list[bytes] = []
            _pack_into(parts, encoder, self.values)
            data = self._packed[key] = b"".join(parts)
        self._last = (encoder, data)
        return data


def expand(args: Args) -> list[str | int | float]:
    """``args`` with the values of each :class:`Packed` in its place (for redis-py's calls)."""
    out: list[str | int | float] = []
    for value in args:
        if type(value) is Packed:
            out += value.values
        else:
            out.append(value)  # type: ignore[arg-type]
    return out


#: What most arguments are, packed once: no text, a flag, a small count.
_PACKED_TEXT = {"": b"$0\r\n\r\n", "1": b"$1\r\n1\r\n"}
_PACKED_INT = [b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(1024)]


def _pack_into(parts: list[bytes], encoder: Any, args: Sequence[Any]) -> int:
    """Append ``args`` to ``parts`` in the Redis protocol; returns how many arguments that is
    (a :class:`Packed` counts as its values)."""
    encoding, errors = encoder.encoding, encoder.encoding_errors
    plain = encoding == "utf-8" and errors == "strict"
    append = parts.append
    count = len(args)
    for value in args:
        kind = type(value)
        if kind is str:
            packed = _PACKED_TEXT.get(value)
            if packed is not None:
                append(packed)
                continue
            data = value.encode() if plain else value.encode(encoding, errors)
        elif kind is int:
            if 0 <= value < 1024:
                append(_PACKED_INT[value])
                continue
            data = b"%d" % value
        elif kind is float:
            data = repr(value).encode()
        elif kind is Packed:
            append(value.packed(encoder))
            count += len(value) - 1
            continue
        else:
            data = bytes(encoder.encode(value))
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    return count


def pack_evalsha(connection: Any, sha: str, keys: Args, args: Args) -> bytes:
    """``EVALSHA sha numkeys *keys *args`` as :func:`pack_command` writes it (a :class:`Packed`
    among the keys counts as its keys)."""
    encoder = connection.encoder
    body: list[bytes] = []
    numkeys = _pack_into(body, encoder, keys)
    count = numkeys + _pack_into(body, encoder, args)
    digits = b"%d" % numkeys
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        count + 3,
        len(sha),
        sha.encode(),
        len(digits),
        digits,
    )
    return head + b"".join(body)


def pack_command(connection: Any, *args: Any) -> bytes:
    """One command in the Redis protocol, as ``connection.pack_command`` writes it, in one
    ``bytes``: text in the connection's encoding, numbers as their ``repr``, any other value
    through the connection's encoder (which refuses what redis-py refuses), and the arguments
    of a :class:`Packed` as it packed them. Four times cheaper than redis-py's general packer,
    which splits and chunks what these calls never need."""
    parts = [b""]
    parts[0] = b"*%d\r\n" % _pack_into(parts, connection.encoder, args)
    return b"".join(parts)


class PendingReply(Pending[Any]):
    """A script call written on this thread's connection whose reply is not read yet.

    :meth:`result` must be called on the thread that sent it; a broken connection sends the
    call again (as the retry policy says), exactly as a call made at once would have.
    """

    def __init__(
        self, calls: DirectCalls, connection: Any, script: Script, keys: Args, args: Args
    ) -> None:
        super().__init__(self._reply)
        self._calls, self._connection = calls, connection
        self._script, self._keys, self._args = script, keys, args

    def collect(self) -> None:
        """Read the reply off the connection, keeping it (or the error) for :meth:`result`."""
        try:
            self.result()
        except Exception:
            return

    def _reply(self) -> Any:
        self._calls.forget(self)
        try:
            return self._connection.read_response()
        except (ConnectionError, TimeoutError, NoScriptError) as exc:
            # Gone with the connection, or a server that lost the script: sent again, on a new
            # connection, with the client's retries.
            if not isinstance(exc, NoScriptError):
                self._connection.disconnect()
        except Exception:
            self._connection.disconnect()
            raise
        return self._calls.call(self._script, self._keys, self._args)


class DirectCalls:
    """Script calls and transactions on ``client``'s server (a ``redis.Redis``), each thread on
    a connection of its own."""

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        #: A Sentinel-managed connection finds the primary in its own ``connect``, which
        #: sending on a closed connection does not call: it is called first.
        self._managed = isinstance(self._pool, SentinelConnectionPool)

    def _connected(self, connection: Any) -> None:
        if self._managed:
            connection.connect()  # at once when it is connected already

    def _connection(self) -> Any:
        local = self._local
        pending: PendingReply | None = getattr(local, "pending", None)
        if pending is not None:
            pending.collect()
        pid = forksafe.pid()
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

    def call(self, script: Script, keys: Args, args: Args) -> Any:
        """``EVALSHA`` of ``script`` (``keys``, ``args``): the reply, as the client gives it."""
        connection = self._connection()
        command = [pack_evalsha(connection, script.sha, keys, args)]

        def once() -> Any:
            self._connected(connection)
            connection.send_packed_command(command, check_health=False)
            try:
                return connection.read_response()
            except NoScriptError:
                connection.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                connection.read_response()
                connection.send_packed_command(command, check_health=False)
                return connection.read_response()

        return self._with_retry(connection, once)

    def send(self, script: Script, keys: Args, args: Args) -> PendingReply:
        """Write ``EVALSHA`` of ``script`` now; its reply is read by ``result()`` (or by this
        thread's next call). Raises at once only if the connection cannot take the command
        even after the client's retries."""
        connection = self._connection()
        command = [pack_evalsha(connection, script.sha, keys, args)]

        def write() -> None:
            self._connected(connection)
            connection.send_packed_command(command, check_health=False)

        self._with_retry(connection, write)
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
            self._connected(connection)
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
