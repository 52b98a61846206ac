"""A loopback HTTP server the end-to-end tests point tools at, observing them independently.

``/slow?key=K&ms=N`` holds the request N ms and records how many requests of key K were in flight
at once; ``/gate?key=K&gate=G`` holds it until the test calls ``open_gate(G)`` (two minutes at
most); ``/flaky?key=K&fail=N`` answers 500 to the first N requests of K, then 200;
``/v1/chat/completions`` is a tiny OpenAI-compatible endpoint (``/v1/<key>/chat/completions`` to
script failures: ``fail500once``; the model ``retry-after-2s`` answers its first call 429 with
Retry-After 2; the model ``local-hold`` is never answered: the request is counted under
``hold:<last message>`` and held until the server stops, longer than any client waits; the model
``local-no-usage`` is answered without ``usage``; requests are also counted per model,
``model:<name>``); ``POST /hook`` records a webhook's body. Every request is timestamped.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class Observations:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.requests: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self.hooks: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: ObserverServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        key = query.get("key", "default")
        obs = self.server.observations
        started = time.time()
        with obs.lock:
            obs.counts[key] += 1
            count = obs.counts[key]
            obs.in_flight[key] += 1
            obs.max_in_flight[key] = max(obs.max_in_flight[key], obs.in_flight[key])
        try:
            if url.path == "/slow":
                time.sleep(int(query.get("ms", "300")) / 1000)
                self._reply(200, {"key": key, "n": count})
            elif url.path == "/gate":
                self.server.gate(query.get("gate", "")).wait(120)
                self._reply(200, {"key": key, "n": count})
            elif url.path == "/flaky":
                if count <= int(query.get("fail", "0")):
                    self._reply(500, {"error": "flaky"})
                else:
                    self._reply(200, {"key": key, "n": count})
            else:
                self._reply(404, {"error": "no such path"})
        finally:
            with obs.lock:
                obs.in_flight[key] -= 1
                obs.requests[key].append((started, time.time()))

    def do_POST(self) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if url.path == "/hook":  # a webhook: recorded as received
            with self.server.observations.lock:
                self.server.observations.hooks.append(body)
            self._reply(200, {"ok": True})
            return
        parts = url.path.strip("/").split("/")
        key = parts[1] if len(parts) == 4 else "chat"
        model = str(body.get("model"))
        messages = body.get("messages") or [{}]
        if model == "local-hold":
            key = f"hold:{messages[-1].get('content')}"
        obs = self.server.observations
        with obs.lock:
            obs.counts[key] += 1
            count = obs.counts[key]
            obs.requests[key].append((time.time(), time.time()))
        if model == "local-hold":
            # Received, never answered: the client times out after it sent the request.
            self.server.closing.wait(60)
            self.close_connection = True
            return
        if key == "fail500once" and count == 1:
            self._reply(500, {"error": {"message": "upstream hiccup"}})
            return
        if key == "rate429once" and count == 1:
            self._reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
            return
        with obs.lock:
            obs.counts[f"model:{model}"] += 1
            model_count = obs.counts[f"model:{model}"]
            obs.requests[f"model:{model}"].append((time.time(), time.time()))
        if model == "retry-after-2s" and model_count == 1:
            self._reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
            return
        prompt = " ".join(m["content"] for m in body.get("messages", []))
        answer: dict[str, Any] = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": f"ok: {prompt}"},
                    "finish_reason": "stop",
                }
            ],
            "model": model,
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
        if model == "local-no-usage":
            del answer["usage"]
        self._reply(200, answer)


class ObserverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.observations = Observations()
        #: Set when the server stops: held requests end (without an answer).
        self.closing = threading.Event()
        self._gates: dict[str, threading.Event] = {}
        self._gates_lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def gate(self, name: str) -> threading.Event:
        """The gate ``/gate?gate=NAME`` requests wait for."""
        with self._gates_lock:
            return self._gates.setdefault(name, threading.Event())

    def open_gate(self, name: str) -> None:
        """Let every request waiting at gate ``name`` (and every later one) through."""
        self.gate(name).set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> ObserverServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)
