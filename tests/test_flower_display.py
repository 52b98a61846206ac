"""What Flower is given to show of a governed task (governance.flower, integration.events),
without Flower: the real thing is in tests/e2e/test_e2e_flower.py, in a browser too."""

from __future__ import annotations

import copy

from celery.events.state import State

from governance.flower import GovernanceTemplates, format_task
from governance.integration.events import (
    PUBLISHER_NODE,
    failure_summary,
    flower_fields,
    limit_setting,
)


def _state_after(*events: dict[str, object]) -> State:
    state = State()
    for clock, event in enumerate(events, start=1):
        state.event({"uuid": "t1", "clock": clock, "local_received": 0, **event})
    return state


def test_a_task_that_waits_shows_no_start_until_it_runs() -> None:
    deferred = flower_fields("deferred", {"reason": "concurrency_limit exceeded: 2 / 1 (200%)"})
    state = _state_after(
        {"type": "task-received", "hostname": "w@h", "timestamp": 10.0, "name": "tools.echo"},
        {"type": "task-started", "hostname": "w@h", "timestamp": 10.1},
        {"type": "task-deferred", "hostname": "w@h", "timestamp": 10.2, **deferred},
    )
    task = state.tasks["t1"]
    assert (task.state, task.started, task.runtime) == ("DEFERRED", None, None)
    # The run that follows its wait starts it again (Flower keeps DEFERRED until it ends).
    state.event({"type": "task-started", "hostname": "w@h", "timestamp": 20.0, "uuid": "t1",
                 "clock": 10, "local_received": 0, "pid": 1})  # fmt: skip
    assert format_task(copy.copy(state.tasks["t1"])).started == 20.0
    state.event({"type": "task-succeeded", "hostname": "w@h", "timestamp": 21.0, "uuid": "t1",
                 "clock": 11, "local_received": 0, "runtime": 1.0, "result": "'ok'"})  # fmt: skip
    assert (state.tasks["t1"].state, state.tasks["t1"].started) == ("SUCCESS", 20.0)


def test_place_in_line_and_turn_in_the_reason() -> None:
    fields = {"reason": "concurrency_limit exceeded: 2 / 1 (200%)", "tenant": "acme"}
    waits = flower_fields("deferred", {**fields, "action": "echo", "ahead": 2})
    assert waits["result"] == (
        "deferred: concurrency_limit exceeded: 2 / 1 (200%) (tenant acme, action echo); "
        "2 ahead of it in line"
    )
    booked = flower_fields("deferred", {**fields, "action": "echo", "turn_ms": 1_800_000_000_000})
    assert booked["result"].endswith("; its turn: 2027-01-15T08:00:00Z")
    assert flower_fields("denied", {"reason": "no"})["result"] == "denied: no"
    assert "started" not in flower_fields("denied", {"reason": "no"})


def test_a_publisher_is_never_a_tasks_worker_and_times_read_as_dates() -> None:
    state = _state_after(
        {"type": "task-held", "hostname": PUBLISHER_NODE, "timestamp": 10.0, "state": "HELD"},
        {"type": "task-rejected", "hostname": PUBLISHER_NODE, "timestamp": 1_800_000_000.5,
         "state": "REJECTED"},
    )  # fmt: skip
    shown = format_task(copy.copy(state.tasks["t1"]))
    assert shown.worker is None
    assert shown.rejected == "2027-01-15 08:00:00 UTC"
    assert state.tasks["t1"].worker is not None  # Flower's own record is left as it is
    real = _state_after({"type": "task-received", "hostname": "w@h", "timestamp": 1.0})
    assert format_task(copy.copy(real.tasks["t1"])).worker.hostname == "w@h"


def test_a_limit_names_its_policy_setting() -> None:
    assert limit_setting("same_step_loop exceeded: 4 / 3 (133%)") == (
        "long_running.max_same_step_repetitions"
    )
    assert limit_setting("waited 612 s for concurrency_limit ...") == "max_wait"
    assert limit_setting("something else") is None
    assert (
        failure_summary(
            "LimitExceeded('token_limit exceeded: 1200 / 1000 (120%)')",
            "token_limit exceeded: 1200 / 1000 (120%)",
        )
        == "limit: token_limit exceeded: 1200 / 1000 (120%) (policy: budgets[].tokens)"
    )
    assert failure_summary("ActionFailed('boom')", "boom") == "failed: boom"
    assert failure_summary("ValueError('x')", "ValueError('x')") == "failed: ValueError('x')"


def test_the_task_list_template_extends_flowers_own() -> None:
    from pathlib import Path

    import flower

    loader = GovernanceTemplates(str(Path(flower.__file__).parent / "templates"))
    ours = loader.load("tasks.html")
    assert b"governance-reason" in ours.code.encode() or "governance-reason" in ours.code
    assert loader.load("flower-tasks.html").name == "flower-tasks.html"
    assert loader.load("base.html").name == "base.html"
