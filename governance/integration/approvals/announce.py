"""Held tasks announced again while a monitor watches, so a Flower started at any time lists
them.

Flower knows only the events it received while it ran, and a held task's ``task-held`` is sent
once, when it is held (and at each approval). While task events are on (a monitor asks: see
:mod:`governance.integration.monitor`), the maintenance leader therefore announces every held
task again every ``GOVERNANCE_HELD_ANNOUNCE_S``, and at once when events go on: a page of one
tenant's held tasks per maintenance round (:data:`ANNOUNCE_PAGE`), oldest first, each event
with the time it was held as its ``received`` time (so it sorts with the others), all of one
page on one broker connection.

Caller: the worker's maintenance thread (the leader).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from governance.integration.approvals.holding import held_event_fields
from governance.integration.events import send_app_events
from governance.integration.runtime import GovernanceRuntime
from governance.store.held import HeldStatus, HeldStore

#: Held tasks announced per maintenance round, at most.
ANNOUNCE_PAGE = 100


class HeldAnnouncer:
    """Announces every held task again, a page per :meth:`round`, while events are on."""

    def __init__(
        self,
        app: Any,
        runtime: GovernanceRuntime,
        page: int = ANNOUNCE_PAGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._app = app
        self._runtime = runtime
        self._page = page
        self._clock = clock
        #: Tenants still to announce in the cycle under way (none: no cycle).
        self._tenants: list[str] = []
        self._cursor: str | None = None
        self._next_cycle = float("-inf")
        #: How many held tasks were announced, in all (tests, logs).
        self.announced = 0

    def round(self, on: bool, tenants: Sequence[str]) -> int:
        """One step: with events ``on``, a cycle over ``tenants`` starts when the last one
        started a period ago (at once when events just went on), and one page of held tasks is
        announced; how many were."""
        if not on:
            self._tenants, self._cursor = [], None
            self._next_cycle = float("-inf")  # on again: a cycle at once
            return 0
        if not self._tenants:
            now = self._clock()
            if now < self._next_cycle:
                return 0
            self._next_cycle = now + self._runtime.settings.held_announce_s
            self._tenants, self._cursor = list(tenants), None
        return self._one_page()

    def _one_page(self) -> int:
        store = HeldStore(self._runtime.state)
        while self._tenants:
            tenant = self._tenants[0]
            page = store.page(tenant, HeldStatus.HELD, limit=self._page, cursor=self._cursor)
            self._cursor = page.next_cursor
            if page.next_cursor is None:
                self._tenants.pop(0)
            if not page.tasks:
                continue
            policy = self._runtime.policy.tenant(tenant)
            events = [
                (task.task_id, held_event_fields(task, policy, task.requested_ms / 1000))
                for task in page.tasks
            ]
            sent = send_app_events(self._app, "held", events, check=False)
            self.announced += sent
            return sent
        return 0
