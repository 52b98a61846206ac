"""A pool process forked while another thread of the worker's main process holds a lock.

Celery's prefork pool forks a replacement from the main process when a pool process dies. Only
the forking thread is copied, but every lock is copied as it is: one that the maintenance
thread held at that instant would stay held in the child forever, and the child's task, already
admitted, would never run nor be acknowledged. These tests fork for real (``os.fork``) while a
thread holds the locks, and ask the child to take each one within a deadline.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from governance import forksafe
from governance.integration.runtime import GovernanceRuntime
from governance.policy import Policy
from governance.settings import GovernanceSettings

ROOT = Path(__file__).resolve().parents[2]

#: How long the child tries each lock (a free lock is taken at once; a held one never is).
CHILD_WAIT_S = 2.0


@contextmanager
def held_by_another_thread(locks: list[Any]) -> Iterator[None]:
    """Hold every lock in ``locks`` from a second thread while the block runs."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.acquire()
        holding.set()
        done.wait()
        for lock in reversed(locks):
            lock.release()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(10), "the holding thread did not take the locks"
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def in_forked_child(check: Callable[[], int]) -> int:
    """Run ``check`` in a forked child; its exit status (``check``'s return value)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            code = check()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def untaken(locks: list[Any]) -> int:
    """How many of ``locks`` this process cannot take within ``CHILD_WAIT_S``."""
    return sum(not lock.acquire(timeout=CHILD_WAIT_S) for lock in locks)


def test_a_plain_lock_held_at_the_fork_stays_held_in_the_child() -> None:
    """The hazard itself, so the tests below can fail: CPython copies a held lock as held."""
    plain = threading.Lock()
    with held_by_another_thread([plain]):
        assert in_forked_child(lambda: untaken([plain])) == 1


@pytest.mark.parametrize("make", [forksafe.lock, forksafe.rlock, forksafe.condition])
def test_a_fork_safe_lock_held_at_the_fork_is_free_in_the_child(make: Callable[[], Any]) -> None:
    made = make()
    with held_by_another_thread([made]):
        assert in_forked_child(lambda: untaken([made])) == 0


def test_a_fork_safe_event_keeps_its_flag_and_works_in_the_child() -> None:
    flag = forksafe.event()
    flag.set()

    def child() -> int:
        return 0 if flag.is_set() and flag.wait(CHILD_WAIT_S) else 1

    assert in_forked_child(child) == 0


def test_the_process_id_kept_without_a_system_call_is_the_child_s_own_after_a_fork() -> None:
    """``forksafe.pid()`` replaces ``os.getpid()`` on the hot path: a forked child that kept
    its parent's id would reuse the parent's connections and seals."""
    assert forksafe.pid() == os.getpid()
    parent = os.getpid()

    def child() -> int:
        return 0 if forksafe.pid() == os.getpid() != parent else 1

    assert in_forked_child(child) == 0


def locks_of(*owners: object) -> list[Any]:
    """The locks and conditions that ``owners`` keep as attributes."""
    kinds = (type(threading.Lock()), type(threading.RLock()), threading.Condition)
    return [value for owner in owners for value in vars(owner).values() if isinstance(value, kinds)]


def test_a_pool_process_forked_while_the_runtime_s_locks_are_held_can_take_each() -> None:
    """Every lock a worker's threads share through the runtime (the policy watch, the pool view
    the maintenance thread reads, the audit sealer, leases, owed settlements, the events flag)
    is free in a pool process forked while another thread held it."""
    settings = GovernanceSettings(
        broker_url="redis://127.0.0.1:1/0",
        state_redis_url="redis://127.0.0.1:1/0",
        config_path=ROOT / "config" / "governance.yaml",
    )
    runtime = GovernanceRuntime(settings, Policy.from_file(settings.config_path))
    owners = (
        runtime,
        runtime.watched_policy,
        runtime.sealer,
        runtime.leases,
        runtime.unsettled,
        runtime.pool_view,
        runtime.events.flag,
    )
    locks = locks_of(*owners)
    assert len(locks) >= len(owners), "every owner above keeps a lock"
    with held_by_another_thread(locks):
        assert in_forked_child(lambda: untaken(locks)) == 0
