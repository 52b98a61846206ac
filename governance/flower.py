"""How Flower shows governed tasks, beyond what its options say: loaded by the shipped
``config/flowerconfig.py`` (``celery -A APP flower --conf=config/flowerconfig.py``).

Flower's own pages show governance states (every governed outcome is a task event), but not
well: its task list cuts the result column at 400 px (~45 characters of a reason), a task held
or denied at publish time names the publisher as its worker (a worker page that does not
exist), REJECTED shows its time as a raw epoch, and the state filters know only Celery's states.
This module gives Flower:

- :func:`format_task` (Flower's ``format_task`` option), applied to every task its task list
  and task pages show: no worker for an event sent by a publisher or ``govctl``
  (:data:`~governance.integration.events.PUBLISHER_NODE`), and a readable ``rejected`` time;
- :func:`use_governance_templates`: Flower's templates, with the task list extended: its result
  column shows a governed task's reason in full (the first line of the result, wrapped; the
  rest in its tooltip), the state badges of the governance states have colours, and there are
  filters for them (HELD, DEFERRED, DENIED, REJECTED, SHADOWED, SUGGESTED); a ``tenant``
  column (``tasks_columns``), from the tenant the governed task's events carry; an event state
  that forgets a publisher's node at once (no offline "worker" per publisher on the Workers
  page); and a **Tenants** page (``/tenants``, in the navigation bar; ``/api/tenants`` in JSON)
  with what ``govctl status`` shows per tenant: running, waiting, the oldest wait, its share of
  the worker time over the last minute, its weight, whether it is paused, and the tenants
  removed from the policy with open tasks.

A task that waits (DEFERRED, HELD) has no Started time until it runs: the event that says it
waits clears it (:func:`governance.integration.events.flower_fields`).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from tornado.template import Loader, Template

from governance.integration.events import PUBLISHER_NODE

#: The governance states, as Flower's filters offer them.
GOVERNANCE_STATES = ("HELD", "DEFERRED", "DENIED", "REJECTED", "SHADOWED", "SUGGESTED")

#: The name under which our task list template reaches Flower's own ``tasks.html``.
_FLOWER_TASKS = "flower-tasks.html"

_PUBLISHER_PREFIX = PUBLISHER_NODE.split("@", 1)[0] + "@"


def _readable(timestamp: Any) -> Any:
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return timestamp


def format_task(task: Any) -> Any:
    """Flower's ``format_task``: ``task`` (a copy of Flower's) as its pages should show it."""
    worker = getattr(task, "worker", None)
    hostname = str(getattr(worker, "hostname", "") or "")
    if hostname.startswith(_PUBLISHER_PREFIX):
        task.worker = None  # sent by a publisher or govctl, never run by a worker
    if getattr(task, "rejected", None) is not None:
        task.rejected = _readable(task.rejected)
    return task


# The task list: Flower's tasks.html, and after its scripts, ours.
_TASKS_HTML = (
    '{% extends "' + _FLOWER_TASKS + '" %}\n'
    "{% block extra_scripts %}\n"
    """<style>
  /* The reason of a governed task, in full: Flower cuts this column at 400px. */
  #tasks-table td.governance-reason {
    max-width: 40rem; min-width: 16rem; white-space: normal; overflow-wrap: anywhere;
    text-overflow: clip;
  }
  .task-state-filter.governance-state { font-style: italic; }
  /* Room for the reasons: the short task id below 1800px (the link and its title have it all). */
  @media (max-width: 1799.98px) {
    #tasks-table .task-uuid-full { display: none; }
    #tasks-table .task-uuid-short { display: inline; }
  }
</style>
<script>
(function ($) {
  "use strict";
  var STATES = """
    + repr(list(GOVERNANCE_STATES)).replace("'", '"')
    + """,
      BADGES = {HELD: "text-bg-warning", DEFERRED: "text-bg-info", DENIED: "text-bg-danger",
                REJECTED: "text-bg-danger", SHADOWED: "text-bg-light", SUGGESTED: "text-bg-light"},
      PATTERN = new RegExp("(?:^|\\\\s)state:(" + STATES.join("|") + ")(?:\\\\s|$)", "i");

  function highlight(table) {
    var match = PATTERN.exec(table.search()), state = match ? match[1].toUpperCase() : null;
    if (!state) {
      $(".task-state-filter.governance-state").removeClass("active").attr("aria-pressed", false);
      return;
    }
    $(".task-state-filter").each(function () {
      var on = $(this).data("task-state") === state;
      $(this).toggleClass("active", on).attr("aria-pressed", on);
    });
  }

  function showReasons(table) {
    var names = table.columns().dataSrc().toArray(),
        result = names.indexOf("result"), state = names.indexOf("state");
    table.rows({page: "current"}).every(function () {
      var row = this.node(), data = this.data();
      if (result >= 0) {
        var cell = $(row).children("td").eq(result), text = data.result;
        cell.removeClass("text-nowrap overflow-auto").addClass("governance-reason");
        if (typeof text === "string" && text.indexOf("\\n") >= 0) {
          cell.text(text.split("\\n")[0]).attr("title", text);
        } else if (text !== null && text !== undefined) {
          cell.attr("title", String(text));
        }
      }
      if (state >= 0 && BADGES[data.state]) {
        $(row).children("td").eq(state).find(".badge")
          .removeClass("text-bg-secondary").addClass(BADGES[data.state]);
      }
    });
  }

  $(document).ready(function () {
    var filters = $(".task-state-filters");
    if (!filters.length || !$.fn.dataTable.isDataTable("#tasks-table")) {
      return;
    }
    var table = $("#tasks-table").DataTable();
    STATES.forEach(function (state) {
      $("<button>", {"class": "task-state-filter governance-state", type: "button",
                     "data-task-state": state, "aria-pressed": "false", text: state})
        .appendTo(filters)
        .on("click", function () {
          table.search("state:" + state).draw();
        });
    });
    table.on("search.dt", function () { highlight(table); });
    table.on("draw.dt", function () { showReasons(table); highlight(table); });
    showReasons(table);
    highlight(table);
  });
}(jQuery));
</script>
{% end %}
"""
)

# The Tenants page: what govctl status shows, per tenant.
_TENANTS_HTML = """{% extends "base.html" %}
{% block title %}Tenants · Flower{% end %}
{% block navbar %}{% module Template("navbar.html", active_tab="tenants") %}{% end %}
{% block container %}
<div class="page-section">
  <header class="page-header"><div><p class="page-eyebrow">Governed tenants</p></div></header>
  <section class="tasks-table-card" aria-label="Tenants">
  <table id="tenants-table" class="table table-hover align-middle w-100 mb-0">
    <thead><tr>
      <th>Tenant</th><th>Running</th><th>Waiting</th><th>Oldest wait</th>
      <th title="Its part of the worker time of all tenants over the last minute">Share</th>
      <th title="Its share of a saturated pool; * an operator's override">Weight</th>
      <th>Paused</th><th>Open</th><th>Overdue</th>
    </tr></thead>
    <tbody>
    {% for row in tenants %}
      <tr data-tenant="{{ row.tenant }}">
        <td>{{ row.tenant }}</td>
        <td>{{ row.running }}</td><td>{{ row.waiting }}</td>
        <td>{{ "" if row.oldest_wait_s is None else "%.1f s" % row.oldest_wait_s }}</td>
        <td>{{ "%.0f%%" % (row.share_last_minute * 100) }}</td>
        <td>{{ "%g" % row.weight }}{{ "*" if row.weight_overridden else "" }}</td>
        <td>{{ "yes" if row.paused else "" }}</td>
        <td>{{ row.open }}</td><td>{{ row.overdue }}</td>
      </tr>
    {% end %}
    </tbody>
  </table>
  </section>
  {% if removed %}
  <section class="tasks-table-card mt-4" aria-label="Removed tenants">
  <p class="px-3 pt-2">Removed from the policy, with open tasks (they end at the time shown
    unless the tenant comes back; <code>govctl tenants end NAME</code> ends them now):</p>
  <table id="removed-tenants-table" class="table align-middle w-100 mb-0">
    <thead><tr><th>Tenant</th><th>Open</th><th>Held</th><th>Tasks end</th></tr></thead>
    <tbody>
    {% for row in removed %}
      <tr data-tenant="{{ row.tenant }}"><td>{{ row.tenant }}</td><td>{{ row.open }}</td>
        <td>{{ row.held }}</td><td>{{ ends(row.ends_at_ms) }}</td></tr>
    {% end %}
    </tbody>
  </table>
  </section>
  {% end %}
</div>
{% end %}
"""

_OVERRIDES = {"tasks.html": _TASKS_HTML, "governance-tenants.html": _TENANTS_HTML}

#: The navigation bar's link to the Tenants page, after Flower's Broker link.
_BROKER_LINK_END = "Broker</a>\n        </li>\n"
_TENANTS_LINK = """        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'tenants' %} active{% end %}"
            href="{{ reverse_url('governance-tenants') }}"
            {% if active_tab == 'tenants' %}aria-current="page"{% end %}>Tenants</a>
        </li>
"""


class GovernanceTemplates(Loader):
    """Flower's templates, with ours in place of some: ours may extend Flower's own under
    ``flower-<name>``."""

    def _create_template(self, name: str) -> Template:
        if name in _OVERRIDES:
            return Template(_OVERRIDES[name], name=name, loader=self)
        if name == _FLOWER_TASKS:
            with open(os.path.join(self.root, "tasks.html"), "rb") as handle:
                return Template(handle.read(), name=name, loader=self)
        if name == "navbar.html":
            with open(os.path.join(self.root, name), encoding="utf-8") as text:
                navbar = text.read()
            if _BROKER_LINK_END in navbar:
                navbar = navbar.replace(_BROKER_LINK_END, _BROKER_LINK_END + _TENANTS_LINK, 1)
            return Template(navbar, name=name, loader=self)
        return super()._create_template(name)


def use_governance_templates() -> None:
    """Make Flower render its pages with :class:`GovernanceTemplates` and forget the nodes of
    publishers (from its conf file, which Flower runs before it builds its web application
    from these settings and its event state)."""
    from flower.urls import settings  # type: ignore[import-untyped]
    from flower.views.tasks import TASK_COLUMNS  # type: ignore[import-untyped]

    settings["template_loader"] = GovernanceTemplates(settings["template_path"])
    _keep_the_tenant()
    TASK_COLUMNS.setdefault("tenant", "Tenant")
    _add_tenants_page()
    _forget_publisher_nodes()


def _keep_the_tenant() -> None:
    """The tenant a governed task's events carry becomes a field of Flower's tasks: Celery's
    event state keeps every field of an event, but copies and serializes only its declared
    ones (Flower's pages and API see copies)."""
    from celery.events.state import Task

    if "tenant" not in Task._fields:
        Task._fields = (*Task._fields, "tenant")
        Task.tenant = None


def _overview(capp: Any) -> tuple[list[Any], list[Any]]:
    """The Tenants page's rows: the tenants of the policy, and those removed with open tasks."""
    from governance.integration.runtime import installed_on, runtime_for
    from governance.integration.tenant_overview import removed_with_open_tasks, tenant_overview

    if installed_on(capp) is None:
        capp.finalize(auto=True)  # governed by its task class: governed when finalized
    runtime = runtime_for(capp)
    return tenant_overview(runtime), removed_with_open_tasks(runtime)


def _add_tenants_page() -> None:
    """Serve the Tenants page and its JSON beside Flower's own (its login and url prefix
    apply: the routes join Flower's list before it builds its application)."""
    from flower.urls import handlers
    from flower.views import BaseHandler  # type: ignore[import-untyped]
    from tornado import web
    from tornado.ioloop import IOLoop

    if any(getattr(h, "name", None) == "governance-tenants" for h in handlers):
        return

    class TenantsView(BaseHandler):  # type: ignore[misc]
        @web.authenticated
        async def get(self) -> None:
            tenants, removed = await IOLoop.current().run_in_executor(
                None, _overview, self.application.capp
            )
            self.render("governance-tenants.html", tenants=tenants, removed=removed, ends=_ends)

    class TenantsApi(BaseHandler):  # type: ignore[misc]
        @web.authenticated
        async def get(self) -> None:
            tenants, removed = await IOLoop.current().run_in_executor(
                None, _overview, self.application.capp
            )
            self.write(
                {
                    "tenants": [t.as_dict() for t in tenants],
                    "removed": [r.as_dict() for r in removed],
                }
            )

    handlers.insert(0, web.url(r"/tenants", TenantsView, name="governance-tenants"))
    handlers.insert(1, (r"/api/tenants", TenantsApi))


def _ends(ends_at_ms: int | None) -> str:
    if ends_at_ms is None:
        return "once the maintenance notices it"
    return str(_readable(ends_at_ms / 1000))


def _forget_publisher_nodes() -> None:
    """Flower's event state files every task event under a worker named after its sender, and
    keeps a worker that announced it left (it passes no ``on_node_leave``), so each publisher's
    event left ``governance-publisher@host`` on the Workers page, offline. Forget that node as
    soon as its event is recorded (its tasks keep their state; :func:`format_task` shows them
    without a worker)."""
    from flower.events import EventsState  # type: ignore[import-untyped]

    recorded = EventsState.event
    if getattr(recorded, "_governance", False):
        return

    def event(self: Any, event: dict[str, Any]) -> Any:
        result = recorded(self, event)
        hostname = str(event.get("hostname") or "")
        if hostname.startswith(_PUBLISHER_PREFIX):
            self.workers.pop(hostname, None)
            self.counter.pop(hostname, None)
        return result

    event._governance = True  # type: ignore[attr-defined]
    EventsState.event = event
