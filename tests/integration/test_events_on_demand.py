"""Task events only while a monitor asks for them, in this process: Celery's own test worker (a
thread, the threads pool) serves a governed app on the test run's real Redis, and an event
receiver on the broker counts what it sends.

Without a monitor no task event is sent (Celery's for plain and governed tasks, the layer's own
from the pool); an ``enable_events`` (what Flower sends every 5 s) switches them on for the
lease, and they stop within the lease once nobody asks again; ``disable_events`` ends them at
once; a worker started with ``-E`` always sends. The flag in the state Redis follows the
worker's events, and the maintenance leader announces held tasks again while events are on.
What needs processes (a prefork pool, a real Flower) is in tests/e2e/test_e2e_events.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker

from governance.integration import GovernedTask, govern, governance_context
from governance.integration.approvals import announce
from governance.integration.approvals.announce import HeldAnnouncer
from governance.integration.monitor import REQUEST_FIELD as FIELD
from governance.integration.monitor import EventsFlag, EventsSwitch
from governance.integration.runtime import runtime_for
from governance.integration.worker.maintenance import MaintenanceThread
from governance.policy.context import ActionContext
from governance.policy.engine import Policy
from governance.settings import GovernanceSettings
from governance.store.events_flag import events_flag_on, write_events_flag
from governance.store.held import HeldStore
from governance.store.keys import DeploymentKeys
from tests.event_log import EventLog
from tests.polling import wait_until

POLICY = """
version: 1
tools:
  ev.echo: compute
  ev.held: process.exec
defaults:
  long_running: disabled
tenants:
  acme:
    allowed_tools: [ev.echo, ev.held]
    tiers:
      agents: {watcher: shadow}
      actions: {process.exec: act_with_approval}
"""

#: The events lease of the workers here (short, so a lapse is quick to see).
LEASE_S = 1.0


def ctx(agent: str = "agent-1", user: str | None = None) -> ActionContext:
    return ActionContext(tenant="acme", agent=agent, run=f"run-{uuid.uuid4().hex[:8]}", user=user)


def make_app(redis_url: str, policy_file: Path, **settings: Any) -> Celery:
    """A governed app with a governed task, an approval-tier one and a plain one."""
    app = Celery("events", broker=redis_url, backend=redis_url, task_cls=GovernedTask)
    app.conf.update(task_default_queue=f"events-{uuid.uuid4().hex}")
    governed_settings = GovernanceSettings(
        broker_url=redis_url,
        state_redis_url=redis_url,
        config_path=policy_file,
        audit_key="events-audit-key",
        lease_ms=2000,
        events_lease_s=LEASE_S,
        **settings,
    )
    govern(app, governed_settings, Policy.from_file(policy_file))

    @app.task(name="ev.echo", shared=False)
    def echo(text: str) -> str:
        return text

    @app.task(name="ev.held", shared=False)
    def held(command: str) -> str:
        return command

    @app.task(name="plain.add", shared=False, base=Task)
    def add(x: int, y: int) -> int:
        return x + y

    return app


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return path


def serve(app: Celery, **options: Any) -> Any:
    """An in-process worker with heartbeats (Celery's event dispatcher is off without any)."""
    return start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        without_heartbeat=False,
        heartbeat_interval=0.2,
        **options,
    )


@pytest.fixture(scope="module")
def app(redis_url: str, policy_file: Path) -> Iterator[Celery]:
    app = make_app(redis_url, policy_file)
    yield app
    app.close()


@pytest.fixture
def served(app: Celery) -> Iterator[tuple[Celery, Any]]:
    """The app and a worker of its own for the test (one test worker in the process at a
    time: Celery's worker state is the process's)."""
    with serve(app) as worker:
        yield app, worker


@pytest.fixture(scope="module")
def maintenance(app: Celery) -> MaintenanceThread:
    """The worker's maintenance, one round at a time (the test worker starts none): one for
    the module, so it keeps the leader lock from test to test."""
    return MaintenanceThread(app, runtime_for(app), node="events-test")


@pytest.fixture
def events(served: tuple[Celery, Any]) -> Iterator[EventLog]:
    log = EventLog(served[0]).start()
    yield log
    log.stop()


def run_tasks(app: Celery) -> list[str]:
    """A plain task, a governed one and a shadowed one (its event comes from the pool's side of
    the worker), each to its end; their ids."""
    plain = app.tasks["plain.add"].delay(2, 3)
    with governance_context(ctx()):
        governed = app.tasks["ev.echo"].delay("hello")
    with governance_context(ctx(agent="watcher")):
        shadowed = app.tasks["ev.echo"].delay("shadow")
    assert plain.get(timeout=20) == 5
    assert governed.get(timeout=20) == "hello"
    assert shadowed.get(timeout=20)["governance"] == "shadowed"
    return [plain.id, governed.id, shadowed.id]


def lease_of(app: Celery) -> Any:
    lease = runtime_for(app).events.worker_lease()
    assert lease is not None, "the worker's consumer follows no events lease"
    return lease


def task_group_on(worker: Any) -> bool:
    dispatcher = worker.consumer.event_dispatcher
    return dispatcher is not None and "task" in dispatcher.groups


def ask_for_events(app: Celery, worker: Any) -> None:
    """What Flower does every 5 s, once: ``enable_events`` (here to the one worker, and its
    reply awaited: the worker's lease was renewed before it replied)."""
    replies = app.control.enable_events(
        destination=[worker.hostname], reply=True, timeout=5, limit=1
    )
    assert replies, "the worker did not answer enable_events"


def test_without_a_monitor_no_task_event_is_sent(
    served: tuple[Celery, Any], events: EventLog, maintenance: MaintenanceThread
) -> None:
    app, worker = served
    assert not lease_of(app).on()
    before = len(events.snapshot())
    run_tasks(app)
    events.settled(worker.hostname)
    assert events.task_events(before) == []
    assert not task_group_on(worker)
    # The maintenance round writes no flag: publishers and govctl send nothing either.
    maintenance.run_once()
    assert not events_flag_on(runtime_for(app).state)


def test_events_flow_while_a_monitor_asks_and_stop_within_the_lease(
    served: tuple[Celery, Any], events: EventLog, maintenance: MaintenanceThread
) -> None:
    app, worker = served
    runtime = runtime_for(app)
    ask_for_events(app, worker)
    assert lease_of(app).on()
    before = len(events.snapshot())
    plain, governed, shadowed = run_tasks(app)
    wanted = {
        ("task-succeeded", plain),
        ("task-succeeded", governed),
        ("task-shadowed", shadowed),
        ("task-received", plain),
    }
    wait_until(lambda: wanted <= set(events.task_events(before)), 20, f"the task events {wanted}")
    maintenance.run_once()
    assert events_flag_on(runtime.state)
    assert 0 < runtime.state.client.pttl(DeploymentKeys.events_on) <= LEASE_S * 1000

    # Nobody asks again: within the lease the worker's task events are off, and the flag
    # lapses with them.
    wait_until(lambda: not task_group_on(worker), LEASE_S * 5, "the worker's task events off")
    assert not lease_of(app).on()
    wait_until(lambda: not events_flag_on(runtime.state), LEASE_S * 5, "the flag to lapse")
    maintenance.run_once()
    assert not events_flag_on(runtime.state)
    events.settled(worker.hostname)
    after = len(events.snapshot())
    run_tasks(app)
    events.settled(worker.hostname)
    assert events.task_events(after) == []


def test_disable_events_ends_the_lease_at_once(
    served: tuple[Celery, Any], events: EventLog
) -> None:
    app, worker = served
    ask_for_events(app, worker)
    assert task_group_on(worker)
    app.control.disable_events(destination=[worker.hostname], reply=True, timeout=5, limit=1)
    assert not lease_of(app).on()
    assert not task_group_on(worker)


def test_held_tasks_are_announced_again_while_events_are_on(
    served: tuple[Celery, Any], events: EventLog, maintenance: MaintenanceThread
) -> None:
    app, worker = served
    runtime = runtime_for(app)
    store = HeldStore(runtime.state)
    assert not lease_of(app).on()
    before = len(events.snapshot())
    with governance_context(ctx(user="dana")):
        held = [app.tasks["ev.held"].delay(f"cmd-{n}") for n in range(3)]
    assert all(r.state == "HELD" for r in held)
    ids = {r.id for r in held}

    maintenance.run_once()  # the leader, events off: nothing announced
    assert maintenance.leading
    events.settled(worker.hostname)
    assert events.task_events(before) == []

    # A monitor asks: the next round announces every held task, with when it was held.
    ask_for_events(app, worker)
    maintenance.run_once()

    def announced() -> dict[str, dict[str, Any]]:
        return {
            str(e["uuid"]): e
            for e in events.snapshot()[before:]
            if e.get("type") == "task-held" and e.get("uuid") in ids
        }

    found = wait_until(lambda: len(announced()) == 3 and announced(), 20, "their task-held")
    for result in held:
        event = found[result.id]
        assert event["state"] == "HELD"
        assert event["name"] == "ev.held"
        assert event["result"].startswith("held: ")
        requested = store.get("acme", result.id)
        assert requested is not None
        assert event["received"] == requested.requested_ms / 1000


def test_a_worker_started_with_task_events_always_sends(redis_url: str, policy_file: Path) -> None:
    # ``-E``: the worker's task_events (the app's worker_send_task_events, if the user set it).
    app = make_app(redis_url, policy_file)
    with serve(app, task_events=True) as worker:
        log = EventLog(app).start()
        try:
            lease = lease_of(app)
            assert lease.always
            assert lease.on()
            assert not worker.consumer.event_dispatcher.groups  # every group: always on
            before = len(log.snapshot())
            plain, governed, shadowed = run_tasks(app)
            wanted = {
                ("task-succeeded", plain),
                ("task-succeeded", governed),
                ("task-shadowed", shadowed),
            }
            wait_until(lambda: wanted <= set(log.task_events(before)), 20, f"events {wanted}")
            runtime = runtime_for(app)
            MaintenanceThread(app, runtime, node=worker.hostname).run_once()
            assert events_flag_on(runtime.state)
        finally:
            log.stop()
    app.close()


def test_govern_switches_no_task_events_on(redis_url: str, policy_file: Path) -> None:
    app = make_app(redis_url, policy_file)
    assert not app.conf.worker_send_task_events
    assert not app.conf.task_send_sent_event
    app.close()
    mine = Celery("mine", broker=redis_url)
    mine.conf.update(worker_send_task_events=True)
    govern(
        mine,
        GovernanceSettings(broker_url=redis_url, config_path=policy_file),
        Policy.from_file(policy_file),
    )
    assert mine.conf.worker_send_task_events is True  # the user's own setting stays
    mine.close()


# -- the parts, one at a time ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_publisher_reads_the_flag_at_most_once_a_second(
    app: Celery, redis_client: redis.Redis
) -> None:
    runtime = runtime_for(app)
    clock = Clock()
    flag = EventsFlag(lambda: runtime.state, clock=clock)
    assert not any(flag.on() for _ in range(50))
    assert flag.reads == 1
    write_events_flag(runtime.state, "a-worker", 60_000)
    clock.now += 0.5
    assert not flag.on()  # read less than a second ago
    clock.now += 0.5
    assert flag.on()
    assert flag.reads == 2
    # A process that is not a worker (no lease here) follows the flag.
    switch = EventsSwitch(lambda: runtime.state)
    assert switch.worker_lease() is None
    assert switch.wanted(app)


def test_a_pool_process_follows_what_its_worker_said_with_the_task(app: Celery) -> None:
    """What the worker's main process put in the governed task's request wins over the flag."""
    runtime = runtime_for(app)
    switch = EventsSwitch(lambda: runtime.state)

    class Running:
        def __init__(self, said: bool) -> None:
            self.current_worker_task = SimpleNamespace(request=SimpleNamespace(**{FIELD: said}))

    write_events_flag(runtime.state, "a-worker", 60_000)
    assert not switch.wanted(Running(False))
    runtime.state.client.delete(DeploymentKeys.events_on)
    assert switch.wanted(Running(True))


def test_held_tasks_are_announced_a_page_per_round_once_per_period(
    app: Celery, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_for(app)
    sent: list[str] = []

    def send(_app: Any, kind: str, events: Any, check: bool = True) -> int:
        assert kind == "held"
        ids = [task_id for task_id, _ in events]
        sent.extend(ids)
        return len(ids)

    monkeypatch.setattr(announce, "send_app_events", send)
    with governance_context(ctx(user="dana")):
        held = [app.tasks["ev.held"].delay(f"page-{n}").id for n in range(5)]
    clock = Clock()
    announcer = HeldAnnouncer(app, runtime, page=2, clock=clock)
    assert announcer.round(False, ["acme"]) == 0
    # Events on: a cycle at once, a page per round, each held task once.
    assert [announcer.round(True, ["acme"]) for _ in range(4)] == [2, 2, 1, 0]
    assert sorted(sent) == sorted(held)
    # The next cycle a period after this one started.
    clock.now += runtime.settings.held_announce_s - 0.1
    assert announcer.round(True, ["acme"]) == 0
    clock.now += 0.1
    assert announcer.round(True, ["acme"]) == 2
    # Off, then on again: a cycle at once.
    announcer.round(False, ["acme"])
    assert announcer.round(True, ["acme"]) == 2
    assert sent[5:] == sent[:2] * 2  # the first page again, each time
