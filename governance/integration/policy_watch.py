"""The policy a process enforces, reloaded when its file changes: no restart.

Every process that enforces the policy (a worker's main and pool processes, publishers) checks
the file's signature (device, inode, size, modification time) at most every
``GOVERNANCE_POLICY_CHECK_S`` seconds, when it next uses the policy. A changed file is loaded and
validated before anything else: a valid one replaces the policy at once, so the next decision and
its audit entry carry its version; an invalid one changes nothing, and its error (the file, the
field, the reason) is logged, kept for the worker's report (``govctl policy status``) and
audited by the worker's maintenance thread.

**The last valid version.** Whenever a process loads a valid file (at start, or a change), it
keeps a copy of that file beside it, ``.<name>.last-valid`` (:func:`last_valid_path`), written
atomically. While the file is invalid, ``govctl`` reads state and decides held tasks with that
copy, which is what the running workers still enforce. A directory it may not write to is
logged once, and the process goes on without a copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from governance import forksafe
from governance.policy.engine import Policy
from governance.policy.loader import ConfigError, load_yaml

log = logging.getLogger("governance")

#: The suffix of the copy of a policy file's last valid version, kept beside it.
LAST_VALID_SUFFIX = ".last-valid"

_unwritable: set[Path] = set()


def last_valid_path(path: Path) -> Path:
    """Where the last valid version of the policy file ``path`` is kept: beside it, hidden,
    e.g. ``config/.governance.yaml.last-valid``."""
    return path.with_name(f".{path.name}{LAST_VALID_SUFFIX}")


def is_last_valid_copy(path: Path) -> bool:
    """Whether ``path`` is itself such a copy (a process using it keeps no copy of a copy)."""
    return path.name.startswith(".") and path.name.endswith(LAST_VALID_SUFFIX)


def keep_last_valid(policy: Policy, path: Path) -> Path | None:
    """Keep the text of ``path`` beside it as its last valid version, if it is ``policy`` (the
    file may have changed since it was loaded: then nothing is written, the next check loads
    it). Atomic: a temporary file in the same directory, then ``os.replace``. Returns the copy,
    or None when nothing was written."""
    if is_last_valid_copy(path):
        return None
    copy = last_valid_path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if copy.is_file() and copy.read_text(encoding="utf-8") == text:
            return copy
        data = load_yaml(text, str(path))
        loaded = Policy.from_dict(data, source=str(path), hook_loader=policy.hook_loader)
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    if loaded.version != policy.version:
        return None
    try:
        fd, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", text=True
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
            os.replace(temporary, copy)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        if copy not in _unwritable:
            _unwritable.add(copy)
            log.info(
                "cannot keep the last valid policy as %s (%s): while %s is invalid, govctl has "
                "no version to fall back on",
                copy,
                exc.strerror or exc,
                path,
            )
        return None
    return copy


FileSignature = tuple[int, int, int, int] | None


def _signature(path: Path | None) -> FileSignature:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class PolicyChange:
    """What a check of the file found: a new version, or an error that kept the old one."""

    old_version: str
    new_version: str | None
    error: str | None


class WatchedPolicy:
    """A policy and the file it came from, reloaded when the file changes."""

    def __init__(self, policy: Policy, path: Path | None, check_s: float) -> None:
        self._policy = policy
        # Only a policy loaded from this file follows it (a policy built in code stays as is).
        self._path = path if path is not None and policy.source == str(path) else None
        self._check_s = check_s
        self._signature = _signature(self._path)
        self._next_check = time.monotonic() + check_s
        self._lock = forksafe.lock()
        #: The error of the last invalid file, until a valid one is loaded.
        self.error: str | None = None
        self.loaded_at = time.time()
        if self._path is not None:
            keep_last_valid(policy, self._path)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def current(self) -> Policy:
        """The policy in force (checks the file first when a check is due)."""
        if self._path is not None and time.monotonic() >= self._next_check:
            self.check()
        return self._policy

    def check(self) -> PolicyChange | None:
        """Reload the file if it changed; what changed, or None."""
        if self._path is None:
            return None
        with self._lock:
            self._next_check = time.monotonic() + self._check_s
            signature = _signature(self._path)
            if signature == self._signature:
                return None
            self._signature = signature
            old = self._policy
            try:
                new = Policy.from_file(self._path, hook_loader=old.hook_loader)
            except (ConfigError, OSError) as exc:
                self.error = str(exc)
                log.error(
                    "the changed policy file is invalid; still enforcing version %s:\n%s",
                    old.version,
                    exc,
                )
                return PolicyChange(old.version, None, self.error)
            self.error = None
            keep_last_valid(new, self._path)
            if new.version == old.version:
                return None
            self._policy = new
            self.loaded_at = time.time()
            log.warning("policy reloaded: version %s replaces %s", new.version, old.version)
            return PolicyChange(old.version, new.version, None)
