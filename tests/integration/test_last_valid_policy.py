"""Every process that loads a valid policy file keeps a copy of it beside it, the version it
enforces while the file is invalid (govctl falls back on it): written atomically, never from
an invalid file, and a directory it may not write to is logged once."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from governance.integration.policy_watch import (
    WatchedPolicy,
    is_last_valid_copy,
    last_valid_path,
)
from governance.policy.engine import Policy

POLICY = """version: 1
tools: {echo: compute}
tenants:
  acme: {allowed_tools: [echo], concurrency: 2}
"""


def _bump(path: Path, text: str) -> None:
    """Write ``text`` with a later modification time (the watcher compares signatures)."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))


def test_a_valid_file_is_kept_beside_it_and_an_invalid_one_never(tmp_path: Path) -> None:
    path = tmp_path / "governance.yaml"
    path.write_text(POLICY)
    path.chmod(0o640)
    copy = last_valid_path(path)
    assert copy == tmp_path / ".governance.yaml.last-valid"
    assert is_last_valid_copy(copy)
    assert not is_last_valid_copy(path)

    watched = WatchedPolicy(Policy.from_file(path), path, check_s=0.01)
    assert copy.read_text() == POLICY
    assert copy.stat().st_mode & 0o777 == 0o640

    changed = POLICY.replace("concurrency: 2", "concurrency: 3")
    _bump(path, changed)
    change = watched.check()
    assert change is not None
    assert change.new_version is not None
    assert copy.read_text() == changed

    _bump(path, changed.replace("concurrency: 3", "concurrency: -3"))
    change = watched.check()
    assert change is not None
    assert change.error is not None
    assert copy.read_text() == changed  # still the last valid version
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".governance.yaml.last-valid",
        "governance.yaml",
    ]  # no temporary file left behind

    # A process that runs on the copy itself keeps no copy of the copy.
    WatchedPolicy(Policy.from_file(copy), copy, check_s=0.01)
    assert not last_valid_path(copy).exists()


def test_a_directory_it_may_not_write_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "locked.yaml"
    path.write_text(POLICY)

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.INFO, logger="governance"):
        for _ in range(3):
            watched = WatchedPolicy(Policy.from_file(path), path, check_s=0.01)
    assert watched.current.version == Policy.from_file(path).version
    assert not last_valid_path(path).exists()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"cannot keep the last valid policy as {last_valid_path(path)} (Permission denied): "
        f"while {path} is invalid, govctl has no version to fall back on"
    )
