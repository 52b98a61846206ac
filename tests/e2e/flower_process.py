"""A real `celery -A workers.app flower` process for the end-to-end tests, started as documented:
the shipped settings (``--conf=config/flowerconfig.py``) and basic auth from the environment
(``FLOWER_BASIC_AUTH``), never on the command line.

Flower only knows what it sees on the event stream while it runs (it replays no history), so it
must be started, and be capturing events, before the tasks under test are published.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx

from governance.embedded.processes import log_tail, stop_processes
from tests.e2e.conftest import CELERY, wait_until

#: The Flower settings the project ships (docker-compose and the demo load the same file).
FLOWER_CONFIG = Path(__file__).resolve().parents[2] / "config" / "flowerconfig.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FlowerProcess:
    """`celery flower` on a free local port; read its HTTP API with :meth:`client`.

    ``app_module`` is the ``-A`` it is started with (Flower shows every worker's events on the
    broker, whatever the app)."""

    user = "admin"

    def __init__(
        self, env: dict[str, str], log_path: Path, app_module: str = "workers.app"
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.app_module = app_module
        self.password = secrets.token_urlsafe(16)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(
            base_url=self.base_url, auth=(self.user, self.password), timeout=5.0
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                self.app_module,
                "flower",
                f"--conf={FLOWER_CONFIG}",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            env={**self.env, "FLOWER_BASIC_AUTH": f"{self.user}:{self.password}"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: self.exited() or self._answers("/healthcheck"),
            timeout_s=timeout_s,
            what="flower to answer /healthcheck",
            poll_s=0.1,
        )
        if self.exited():
            raise RuntimeError(f"flower exited at start:\n{self.log_tail()}")

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _answers(self, path: str) -> bool:
        try:
            return self._http.get(path).status_code == 200
        except httpx.TransportError:
            return False

    def client(self, auth: tuple[str, str] | None = None) -> httpx.Client:
        """A client without credentials, or with ``auth``; the caller closes it."""
        return httpx.Client(base_url=self.base_url, auth=auth, timeout=5.0)

    def get_json(self, path: str, **params: Any) -> Any:
        response = self._http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def tasks(self) -> dict[str, dict[str, Any]]:
        """``GET /api/tasks``: every task Flower knows, by id."""
        tasks: dict[str, dict[str, Any]] = self.get_json("/api/tasks")
        return tasks

    def workers(self) -> dict[str, bool]:
        """``GET /api/workers?status=true``: every worker in Flower's event state, alive or not
        (the Workers page lists the same)."""
        workers: dict[str, bool] = self.get_json("/api/workers", status="true")
        return workers

    def datatable(self, search: str = "", length: int = 100) -> list[dict[str, Any]]:
        """The rows of the task list (``/tasks/datatable``, what its page draws), newest first;
        ``search`` as typed in its search box (``state:HELD``)."""
        params = {
            "draw": "1", "start": "0", "length": str(length), "search[value]": search,
            "order[0][column]": "0", "order[0][dir]": "desc", "columns[0][data]": "received",
        }  # fmt: skip
        rows: list[dict[str, Any]] = self.get_json("/tasks/datatable", **params)["data"]
        return rows

    def page(self, path: str) -> str:
        """An HTML page of Flower's (``/tenants``), as an operator who logged in sees it."""
        response = self._http.get(path)
        response.raise_for_status()
        return response.text

    def task_page(self, task_id: str) -> str:
        """The task's HTML page (``/task/<id>``), as an operator sees it."""
        response = self._http.get(f"/task/{task_id}")
        response.raise_for_status()
        return response.text

    def task_info(self, task_id: str) -> dict[str, Any] | None:
        """``GET /api/task/info/<id>``, or None while Flower does not know the task."""
        response = self._http.get(f"/api/task/info/{task_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        info: dict[str, Any] = response.json()
        return info

    def stop(self) -> None:
        self._http.close()
        if self.process is None:
            return
        stop_processes([self.process])
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)
