"""Fixtures for the workers tests: a scripted loopback HTTP server and a tool workspace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.loopback import LoopbackServer


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1, stopped (socket closed) after the test."""
    server = LoopbackServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace directory, with room for an `outside` sibling next to it."""
    path = tmp_path / "workspace"
    path.mkdir()
    return path
