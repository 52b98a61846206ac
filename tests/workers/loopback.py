"""A real HTTP server on 127.0.0.1 that answers from a script, for testing HTTP clients.

Each route (method, path) has a queue of replies: a request takes the first one, and the last one
keeps answering, so `[500, 200]` means "fail once, then succeed". Every request is recorded.
A reply with `drip_s` sends its whole response (status line, headers, body) one byte at a time,
`drip_s` apart, like a slow-drip attacker; one with `hang_up` reads the request and closes the
connection without answering.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted response; a dict or list body is sent as JSON."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drip_s: float = 0.0
    hang_up: bool = False

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, bytes):
            data = self.body
        elif isinstance(self.body, str):
            data = self.body.encode("utf-8")
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            data = json.dumps(self.body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        return data, headers


@dataclass(frozen=True)
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: LoopbackServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout tests) resets the connection; that is expected here.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        owner = self.server.owner
        reply = owner.record_and_pick(
            Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        if reply.delay_s:
            owner.stopping.wait(reply.delay_s)
        if reply.hang_up:
            self.close_connection = True
            return
        data, headers = reply.encoded()
        if reply.drip_s:
            self._drip(reply, data, headers)
            return
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drip(self, reply: Reply, data: bytes, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {reply.status} Drip", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
        self.close_connection = True
        for index in range(len(raw)):
            self.wfile.write(raw[index : index + 1])
            self.wfile.flush()
            if self.server.owner.stopping.wait(reply.drip_s):
                return

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()


class LoopbackServer:
    """Started on a free port by `start()`; `stop()` shuts it down and closes its socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def route(self, method: str, path: str, *replies: Reply) -> None:
        """Script the replies of `method path` (at least one)."""
        if not replies:
            raise ValueError("a route needs at least one reply")
        with self._lock:
            self._routes[(method, path)] = list(replies)

    def record_and_pick(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            queue = self._routes.get((request.method, request.path))
            if not queue:
                return Reply(404, f"no route for {request.method} {request.path}")
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
