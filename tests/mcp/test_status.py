"""Where a task is, in the words of the progress notifications."""

from __future__ import annotations

from governance.mcp.status import TaskView, error_text, held_text, waiting_text, where_text
from governance.policy.limits import Violation, ViolationType


def test_waiting_for_a_concurrency_slot_counts_those_running_and_those_ahead() -> None:
    reason = Violation(ViolationType.concurrency_limit, 4, 3).message
    info = {"violation": "concurrency_limit", "reason": reason, "ahead": 2}
    assert waiting_text(info, now_ms=0) == "waiting: concurrency 3/3, 2 ahead"
    assert waiting_text({**info, "ahead": 0}, now_ms=0) == "waiting: concurrency 3/3, next in line"
    runs = Violation(ViolationType.run_concurrency_limit, 3, 2).message
    assert (
        waiting_text({"violation": "run_concurrency_limit", "reason": runs, "ahead": 1}, now_ms=0)
        == "waiting: runs in flight 2/2, 1 ahead"
    )


def test_a_booked_turn_and_other_waits() -> None:
    booked = {"violation": "rate_limit", "reason": "rate_limit exceeded: ...", "turn_ms": 2500}
    assert waiting_text(booked, now_ms=1300) == "waiting: rate limit, turn in 1.2 s"
    budget = {
        "violation": "token_limit",
        "reason": Violation(ViolationType.token_limit, 1200, 1000).message,
        "ahead": 0,
    }
    assert waiting_text(budget, now_ms=0).startswith("waiting: token limit 1200/1000")
    outage = {"violation": "store_unavailable", "reason": "...", "retry_in_s": 0.5}
    assert waiting_text(outage, now_ms=0) == (
        "waiting: state store unavailable, trying again in 0.5 s"
    )


def test_held_and_elsewhere() -> None:
    assert held_text(1, 2) == "held: 1 of 2 approvals"
    assert held_text(0, 1) == "held: 0 of 1 approval"
    assert held_text(0, 1, "cost_alert") == "held at the run's cost alert: 0 of 1 approval"
    assert where_text("queued", "PENDING") == "queued"
    assert where_text("running", "DEFERRED") == "running"
    assert where_text("handed", "DEFERRED") == "a slot is free: starting"


def test_failures_read_as_their_class_and_reason() -> None:
    assert error_text(ValueError("bad")) == "ValueError: bad"
    assert error_text({"exc_type": "LimitExceeded", "exc_message": ["over"]}) == (
        "LimitExceeded: over"
    )


def test_done_and_started() -> None:
    assert TaskView("t", "SUCCESS").done
    assert TaskView("t", "REVOKED").done
    assert not TaskView("t", "HELD").done
    assert TaskView("t", "DEFERRED", "running").started
    assert not TaskView("t", "DEFERRED", "waiting").started
