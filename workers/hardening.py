"""Hardening of the worker process itself: its memory and environment closed to its own user.

A worker holds secrets in its environment and memory (the audit key, the release secret, the
state Redis URL with its password, an LLM API key). Linux lets any process of the same user read
`/proc/<pid>/environ` and `/proc/<pid>/mem` of another, so a `shell` command running as the
worker's user (a worker that is not root) could read them. `prctl(PR_SET_DUMPABLE, 0)` closes
that: those files become root's, ptrace by the same user is refused, and no core dump is written.
The flag is inherited across fork and reset by exec, so the commands `shell` runs are unaffected.

`workers/app.py` calls `make_process_non_dumpable` from Celery's `worker_init` (the main
process) and `worker_process_init` (each pool process) signals. Tools such as `py-spy` then need
root to attach to a worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["is_dumpable", "make_process_non_dumpable"]

log = logging.getLogger(__name__)

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.prctl(option, value, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def make_process_non_dumpable() -> bool:
    """Make this process non-dumpable; whether it is now (False, logged, off Linux)."""
    if not sys.platform.startswith("linux"):
        log.warning("cannot make the worker non-dumpable on %s: prctl is Linux-only", sys.platform)
        return False
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot make the worker non-dumpable: prctl(PR_SET_DUMPABLE) failed: %s", exc)
        return False
    return True


def is_dumpable() -> bool:
    """Whether this process is dumpable (its /proc files readable by its own user)."""
    if not sys.platform.startswith("linux"):
        return True
    return _prctl(PR_GET_DUMPABLE) != 0
