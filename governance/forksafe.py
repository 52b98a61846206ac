"""Locks and events that a forked child gets back unlocked.

Celery's prefork pool forks a new pool process from the worker's main process whenever one
dies (a SIGKILL, a hard time limit, ``max_tasks_per_child``). ``fork()`` copies only the thread
that calls it, but it copies every lock as it is at that instant: a lock that another thread of
the main process held then (the maintenance thread reading the pool from Redis, a seal being
queued) stays held forever in the child, whose first use of it blocks for good. A child that
has admitted its task by then never runs it nor acknowledges its delivery, until RabbitMQ's
consumer timeout closes the channel and stops the worker (or a Redis broker's visibility timeout
redelivers it): what parallel test runs showed after a pool process was killed.

Every lock, condition and event that a governed process shares between its threads is made
here. Each is registered, and a child re-creates them all right after a fork
(``os.register_at_fork``), as :mod:`logging` does for its handlers' locks. What such a lock
guarded is per process anyway (caches read again, seals owed, leases renewed), and the objects
that hold it check :func:`pid` where the parent's contents must not be reused.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol, TypeVar, cast


class _ReinitAtFork(Protocol):
    """What ``threading`` gives its own primitives for this (CPython 3.9+)."""

    def _at_fork_reinit(self) -> None: ...


_Made = TypeVar("_Made")

#: Every primitive made here and still alive.
_MADE: weakref.WeakSet[object] = weakref.WeakSet()


def _registered(made: _Made) -> _Made:
    _MADE.add(made)
    return made


def lock() -> threading.Lock:
    """A ``threading.Lock`` that is unlocked in a forked child."""
    return _registered(threading.Lock())


def rlock() -> threading.RLock:
    """A ``threading.RLock`` that is unlocked (and unowned) in a forked child."""
    return _registered(threading.RLock())


def event() -> threading.Event:
    """A ``threading.Event`` whose inner lock is unlocked in a forked child (its flag stays)."""
    return _registered(threading.Event())


def condition() -> threading.Condition:
    """A ``threading.Condition`` (over its own lock) that is unlocked in a forked child."""
    return _registered(threading.Condition())


#: This process's id, kept up to date by the fork hook below (see :func:`pid`).
_PID = os.getpid()


def pid() -> int:
    """This process's id, without a system call: ``os.getpid()`` is one on every call (glibc
    caches it no more), and the hot path asks "am I still the process that made this?" about
    twenty times per governed task. A child forked by ``os.fork()`` (Celery's prefork pool
    and ``multiprocessing`` use it) gets its own id before anything else runs in it."""
    return _PID


def _reinit_in_child() -> None:
    global _PID
    _PID = os.getpid()
    for made in list(_MADE):
        cast(_ReinitAtFork, made)._at_fork_reinit()


os.register_at_fork(after_in_child=_reinit_in_child)
