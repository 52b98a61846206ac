"""One HTTP request to one address that was already checked, under one total deadline.

`open_get` connects to `address` and never resolves the URL's host name again, so a DNS answer
that changes between the check and the connection (DNS rebinding) cannot move the request
elsewhere. The request still carries the original Host header, and for https the TLS handshake
sends SNI for the original host name and verifies the certificate against it.

The deadline covers the whole request: the connection, the TLS handshake, every write and every
read, headers and body. Each network operation only gets what is left of it, and a watchdog
shuts the socket down when it passes, so a server that drips one byte a second (which a
per-read timeout never catches) fails at the deadline like a server that says nothing.

httpcore (the engine under httpx) is used directly because it lets us provide the network
backend; proxies from the environment are deliberately not used, as they would connect on our
behalf to an address we did not check.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from workers.tools.netguard import IPAddress

__all__ = ["DEFAULT_PORTS", "Deadline", "PinnedBackend", "open_get"]

DEFAULT_PORTS = {"http": 80, "https": 443}


class Deadline:
    """A point in time, `seconds` from now, that a whole request must finish by."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    @property
    def message(self) -> str:
        return f"the total deadline of {self.seconds:g} s was exceeded"

    def left(self, error: type[Exception]) -> float:
        """The time left for one operation, or `error` when there is none."""
        left = self.remaining()
        if left <= 0:
            raise error(self.message)
        return left


class _Watchdog:
    """Shuts a socket down at the deadline, waking any operation still blocked on it.

    It keeps its own duplicate of the socket: shutting that down ends the connection for every
    descriptor (also once TLS wrapped the original), and it is never a recycled descriptor.
    """

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._sock = sock.dup()
        self._timer = threading.Timer(max(deadline.remaining(), 0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()
        self._sock.close()


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation ends by the deadline, with the deadline as the reason."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def _expired(self, error: type[Exception]) -> None:
        if self._deadline.expired:
            raise error(self._deadline.message)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        left = self._deadline.left(httpcore.ReadTimeout)
        try:
            data = self._inner.read(max_bytes, left)
        except (httpcore.TimeoutException, httpcore.NetworkError):
            self._expired(httpcore.ReadTimeout)
            raise
        if not data:  # the watchdog's shutdown looks like the end of the stream
            self._expired(httpcore.ReadTimeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        left = self._deadline.left(httpcore.WriteTimeout)
        try:
            self._inner.write(buffer, left)
        except (httpcore.TimeoutException, httpcore.NetworkError):
            self._expired(httpcore.WriteTimeout)
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline.left(httpcore.ConnectTimeout)
        try:
            tls = self._inner.start_tls(ssl_context, server_hostname, left)
        except (httpcore.TimeoutException, httpcore.NetworkError):
            self._expired(httpcore.ConnectTimeout)
            raise
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects every request to `address`, whatever host name the URL has, by the deadline."""

    def __init__(self, address: IPAddress, deadline: Deadline) -> None:
        self.address = address
        self.deadline = deadline
        self._inner = httpcore.SyncBackend()
        self._watchdogs: list[_Watchdog] = []

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = self.deadline.left(httpcore.ConnectTimeout)
        try:
            stream = self._inner.connect_tcp(
                str(self.address), port, left, local_address, socket_options
            )
        except httpcore.ConnectTimeout:
            raise httpcore.ConnectTimeout(
                f"connecting to {self.address} port {port}: {self.deadline.message}"
            ) from None
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            self._watchdogs.append(_Watchdog(sock, self.deadline))
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used by network tools")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        """Stop the watchdogs (the connections themselves are closed by the pool)."""
        for watchdog in self._watchdogs:
            watchdog.cancel()
        self._watchdogs.clear()


@contextlib.contextmanager
def open_get(
    url: httpx.URL,
    address: IPAddress,
    deadline: Deadline,
    headers: Iterable[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[httpcore.Response]:
    """GET `url` from `address`; yields the response with its body not read yet.

    `ssl_context` defaults to httpcore's: certificates verified against certifi's CAs. Raises
    httpcore's exceptions (`TimeoutException`, `NetworkError`, `ProtocolError`); the deadline's
    message says when the deadline was the cause.
    """
    backend = PinnedBackend(address, deadline)
    target = httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )
    # The Host header is the URL's host (and port when not the default), with IPv6 in brackets.
    request_headers = [(b"Host", url.netloc), *((k.encode(), v.encode()) for k, v in headers)]
    try:
        with (
            httpcore.ConnectionPool(
                ssl_context=ssl_context, network_backend=backend, retries=0, max_connections=1
            ) as pool,
            pool.stream("GET", target, headers=request_headers) as response,
        ):
            yield response
    finally:
        backend.close()
