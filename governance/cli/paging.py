"""Listing held tasks a page at a time, of one tenant or of all of them, in O(page) work.

One tenant: the held store's own page and cursor. All tenants: one page of each tenant's index
(``limit`` entries each, so the work is tenants x page, never the number held), merged oldest
first; the cursor remembers where each tenant's listing stands, so following it lists every task
exactly once.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from governance.cli.errors import CliError, ExitCode

if TYPE_CHECKING:
    from governance.store.held import HeldStatus, HeldStore, HeldTask

#: Composite cursors start with this, so they are never mistaken for a tenant's own cursor.
MULTI_PREFIX = "m."


@dataclass(frozen=True)
class Listing:
    tasks: list[HeldTask]
    next_cursor: str | None
    total: int


def list_tenant(
    store: HeldStore, tenant: str, status: HeldStatus, limit: int, cursor: str | None
) -> Listing:
    if cursor is not None and (cursor.startswith(MULTI_PREFIX) or ":" not in cursor):
        raise CliError(
            "this cursor is not one of a single tenant's listing: drop --tenant, or the cursor",
            ExitCode.USAGE,
        )
    page = store.page(tenant, status, limit=limit, cursor=cursor)
    return Listing(page.tasks, page.next_cursor, store.count(tenant, status))


def list_all(
    store: HeldStore,
    tenants: list[str],
    status: HeldStatus,
    limit: int,
    cursor: str | None,
) -> Listing:
    """Up to ``limit`` tasks of all ``tenants``, oldest first, after ``cursor``."""
    positions = _decode(cursor) if cursor else {}
    candidates: list[tuple[int, str, str, HeldTask]] = []
    pages: dict[str, tuple[int, str | None]] = {}  # tenant -> (tasks read, its next cursor)
    total = 0
    for tenant in tenants:
        total += store.count(tenant, status)
        if tenant in positions and positions[tenant] is None:
            continue  # this tenant was listed to its end
        page = store.page(tenant, status, limit=limit, cursor=positions.get(tenant))
        pages[tenant] = (len(page.tasks), page.next_cursor)
        candidates += [(t.requested_ms, tenant, t.task_id, t) for t in page.tasks]
    candidates.sort(key=lambda c: c[:3])
    chosen = candidates[:limit]
    after: dict[str, str | None] = dict(positions)
    taken: dict[str, int] = {}
    for requested_ms, tenant, task_id, _ in chosen:
        taken[tenant] = taken.get(tenant, 0) + 1
        # The held store's cursor: the last listed entry's score (requested_ms) and member.
        after[tenant] = f"{requested_ms}:{task_id}"
    more = False
    for tenant, (read, next_cursor) in pages.items():
        if taken.get(tenant, 0) == read:
            after[tenant] = next_cursor  # None: listed to its end
            more = more or next_cursor is not None
        else:
            more = True
    tasks = [c[3] for c in chosen]
    return Listing(tasks, _encode(after) if more else None, total)


def _encode(positions: dict[str, str | None]) -> str:
    raw = json.dumps(positions, separators=(",", ":"), sort_keys=True).encode()
    return MULTI_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> dict[str, str | None]:
    if not cursor.startswith(MULTI_PREFIX):
        raise CliError(
            "this cursor is one tenant's listing: pass the same --tenant with it", ExitCode.USAGE
        )
    body = cursor[len(MULTI_PREFIX) :]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise CliError(f"invalid cursor {cursor!r}", ExitCode.USAGE) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in data.items()
    ):
        raise CliError(f"invalid cursor {cursor!r}", ExitCode.USAGE)
    return data
