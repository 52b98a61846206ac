"""The policy a process enforces, reloaded when its file changes: no restart.

Every process that enforces the policy (a worker's main and pool processes, publishers) checks
the file's signature (device, inode, size, modification time) at most every
``GOVERNANCE_POLICY_CHECK_S`` seconds, when it next uses the policy. A changed file is loaded and
validated before anything else: a valid one replaces the policy at once, so the next decision and
its audit entry carry its version; an invalid one changes nothing, and its error (the file, the
field, the reason) is logged, kept for the worker's report (``govctl policy status``) and
audited by the worker's maintenance thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from governance.policy.engine import Policy
from governance.policy.loader import ConfigError

log = logging.getLogger("governance")

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
        self._lock = threading.Lock()
        #: The error of the last invalid file, until a valid one is loaded.
        self.error: str | None = None
        self.loaded_at = time.time()

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
            if new.version == old.version:
                return None
            self._policy = new
            self.loaded_at = time.time()
            log.warning("policy reloaded: version %s replaces %s", new.version, old.version)
            return PolicyChange(old.version, new.version, None)
