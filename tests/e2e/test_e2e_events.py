"""Task events only while a monitor asks for them, with a real prefork worker and a real Flower
on a deployment of their own (its own broker: no other test's Flower asks its worker).

Without a monitor the broker carries no task event at all (an event receiver counts them while
tasks of every kind run: plain, governed, shadowed in a pool process, held and denied by the
publisher); a Flower started while tasks are held lists them (announced again when its first
``enable_events`` switches events on) and shows what happens while it runs; once it stops, the
worker stops sending within the events lease. The branches are in
tests/integration/test_events_on_demand.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from governance.integration import ActionDenied
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.events_flag import events_flag_on
from tests.e2e.conftest import Deployment, WorkerProcess, wait_until
from tests.e2e.flower_process import FlowerProcess
from tests.event_log import EventLog
from workers.api import submit_tool

pytestmark = pytest.mark.timeout(180)

#: The workers' events lease here (short: the test waits for it to lapse).
LEASE_S = 3


def ctx(tenant: str, agent: str) -> ActionContext:
    return ActionContext(tenant=tenant, agent=agent, run="run-events", user="dana")


def run_tasks(app: Celery) -> list[str]:
    """A plain task, a governed one, a shadowed one (its event comes from a pool process) and
    a denial at publish (its event from this publisher), each to its end; the ids of the
    first three."""
    plain = app.send_task("celery.accumulate", args=(1, 2))
    governed = submit_tool(app, ctx("t-basic", "events-agent"), "echo", text="hi")
    shadowed = submit_tool(app, ctx("t-basic", "watcher"), "echo", text="shadow")
    with pytest.raises(ActionDenied):
        submit_tool(app, ctx("t-basic", "intern-9"), "write_file", path="x", content="x")
    assert plain.get(timeout=30) == [1, 2]
    assert governed.get(timeout=30) == {"text": "hi"}
    assert shadowed.get(timeout=30)["governance"] == "shadowed"
    return [plain.id, governed.id, shadowed.id]


def hold(app: Celery, n: int) -> list[str]:
    """``n`` calls held at publish (they never reach the broker); their ids."""
    ids = []
    for i in range(n):
        result = submit_tool(
            app, ctx("t-held", "events-agent"), "write_file", path=f"held-{i}", content="x"
        )
        assert result.state == "HELD"
        ids.append(result.id)
    return ids


def no_task_events(log: EventLog, worker: WorkerProcess, since: int) -> None:
    log.settled(worker.node_name)
    assert log.task_events(since) == []


def test_task_events_flow_only_while_flower_runs(
    make_deployment: Callable[..., Deployment], tmp_path: Path
) -> None:
    deployment = make_deployment(
        GOVERNANCE_EVENTS_LEASE_S=str(LEASE_S),
        # Longer than the test: a Flower lists held tasks from the announcement made when its
        # first ask switches the events on.
        GOVERNANCE_HELD_ANNOUNCE_S="600",
    )
    app, runtime = deployment.app, deployment.runtime
    worker = deployment.start_worker(
        "events", concurrency=2, extra_args=("--heartbeat-interval=1",)
    )
    log = EventLog(app).start()
    try:
        # No monitor: nothing on the broker's event exchange but the worker's own heartbeats.
        since = len(log.snapshot())
        held = hold(app, 2)
        run_tasks(app)
        no_task_events(log, worker, since)
        assert not events_flag_on(runtime.state)

        flower = FlowerProcess(deployment.env, tmp_path / "flower.log")
        flower.start()
        try:
            watched_by(flower, app, runtime, held)
        finally:
            flower.stop()

        # Flower stopped asking: within the lease the worker's task events are off, the flag
        # lapses, and tasks of every kind run without a single task event.
        wait_until(
            lambda: "task events off" in worker.log_tail(200),
            LEASE_S + 10,
            "the worker to switch its task events off",
        )
        wait_until(lambda: not events_flag_on(runtime.state), LEASE_S + 10, "the flag to lapse")
        since = len(log.snapshot())
        hold(app, 1)
        run_tasks(app)
        no_task_events(log, worker, since)
    finally:
        log.stop()


def watched_by(
    flower: FlowerProcess, app: Celery, runtime: GovernanceRuntime, held: list[str]
) -> None:
    """While Flower runs: it lists the tasks held before it started, and sees the tasks run now
    (the worker's events, a pool process's, a publisher's)."""

    def state(task_id: str) -> str | None:
        task = flower.tasks().get(task_id)
        return str(task["state"]) if task else None

    try:
        wait_until(
            lambda: all(state(t) == "HELD" for t in held), 60, "flower to list the held tasks"
        )
        # The publisher's events follow the flag the worker keeps (read once a second here).
        wait_until(lambda: runtime.events.wanted(app), 20, "the publisher to see the flag")
        plain, governed, shadowed = run_tasks(app)
        wanted = {plain: "SUCCESS", governed: "SUCCESS", shadowed: "SHADOWED"}
        wait_until(
            lambda: all(state(t) == s for t, s in wanted.items()), 30, f"flower to show {wanted}"
        )
        wait_until(
            lambda: any(t["state"] == "DENIED" for t in flower.tasks().values()),
            30,
            "flower to show the denial at publish",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nflower log:\n{flower.log_tail()}") from None
