"""The Celery benchmark: its pieces, and a tiny real run (a worker, a private Redis) end to end.

The run goes through a subprocess, as ``make bench`` does, so the worker it starts, the
environment it sets and the connections it opens stay out of the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from governance.bench.celery_bench import (
    BENCH_POLICY,
    CPU_ROLES,
    SCRIPTS,
    Batch,
    CpuReading,
    ServerCounters,
    batch_sizes,
    bench_env,
    child_pids,
    cpu_ms_per_task,
    process_cpu_s,
    summarize,
)
from governance.policy.engine import Policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("total", "rounds", "expected"),
    [(5000, 4, [1250] * 4), (10, 3, [4, 3, 3]), (3, 3, [1, 1, 1]), (7, 1, [7])],
)
def test_batch_sizes_add_up_to_the_total(total: int, rounds: int, expected: list[int]) -> None:
    assert batch_sizes(total, rounds) == expected
    assert sum(batch_sizes(total, rounds)) == total


def test_the_bench_policy_loads_and_switches_every_check_on(tmp_path: Path) -> None:
    env = bench_env("redis://127.0.0.1:6399/5", tmp_path)
    assert env["GOVERNANCE_BROKER_URL"] == "redis://127.0.0.1:6399/0"
    assert env["GOVERNANCE_STATE_REDIS_URL"] == "redis://127.0.0.1:6399/1"
    policy = Policy.from_file(env["GOVERNANCE_CONFIG_PATH"])
    tenant = policy.tenant("bench")
    assert tenant is not None
    assert tenant.concurrency is not None
    assert tenant.rate_limits.tenant is not None
    assert {b.period for b in tenant.budgets} == {"day", "month", "run"}
    assert BENCH_POLICY["tenants"]["bench"]["allowed_tools"] == ["echo"]


def test_server_counters_leave_out_their_own_info_call() -> None:
    before = ServerCounters({"evalsha": 10, "info": 3, "get": 1})
    after = ServerCounters({"evalsha": 14, "info": 4, "get": 1, "eval": 1})
    assert after.since(before) == {"evalsha": 4, "eval": 1}
    assert set(SCRIPTS) == {"evalsha", "eval"}


def test_summarize_subtracts_the_background_seen_during_plain_batches() -> None:
    batches = [
        Batch("plain", 1, 100, 1.0, {"evalsha": 2, "lpush": 100}),
        Batch("governed", 1, 100, 2.0, {"evalsha": 404, "lpush": 100}),
        Batch("plain", 2, 100, 1.0, {"evalsha": 2, "lpush": 100}),
        Batch("governed", 2, 100, 2.0, {"evalsha": 404, "lpush": 100}),
    ]
    summary = summarize(batches)
    assert summary["plain"]["tasks"] == summary["governed"]["tasks"] == 200
    assert summary["plain"]["tasks_per_s"] == 100.0
    assert summary["governed"]["tasks_per_s"] == 50.0
    assert summary["governed_to_plain_ratio"] == 0.5
    assert summary["background_script_calls_per_s"] == 2.0
    assert summary["script_calls_per_governed_task_raw"] == 4.04
    assert summary["script_calls_per_governed_task"] == 4.0
    assert "round_trips" not in summary


def test_summarize_gives_the_bare_round_trips_ratio_to_plain_when_measured() -> None:
    batches = [
        Batch("plain", 1, 100, 1.0, {"lpush": 100}),
        Batch("governed", 1, 100, 2.0, {"evalsha": 200, "lpush": 100}),
        Batch("round_trips", 1, 100, 1.25, {"evalsha": 200, "lpush": 100}),
        Batch("plain", 2, 300, 3.0, {"lpush": 300}),
        Batch("governed", 2, 300, 6.0, {"evalsha": 600, "lpush": 300}),
        Batch("round_trips", 2, 300, 3.75, {"evalsha": 600, "lpush": 300}),
    ]
    summary = summarize(batches)
    assert summary["round_trips"]["tasks"] == 400
    assert summary["round_trips"]["tasks_per_s"] == 80.0
    assert summary["round_trips_to_plain_ratio"] == 0.8
    assert summary["governed_to_plain_ratio"] == 0.5
    # the yardstick's own script calls are not mistaken for background
    assert summary["background_script_calls_per_s"] == 0.0
    assert summary["script_calls_per_governed_task"] == 2.0


def test_cpu_since_counts_only_pool_processes_that_served_the_whole_batch() -> None:
    before = CpuReading(publisher=1.0, worker_main=2.0, pool={10: 1.0, 11: 5.0}, redis_server=3.0)
    # 11 was replaced by 12 during the batch: neither is counted.
    after = CpuReading(publisher=1.5, worker_main=2.25, pool={10: 1.75, 12: 0.5}, redis_server=4.0)
    assert after.since(before) == {
        "publisher": 0.5,
        "worker_main": 0.25,
        "pool": 0.75,
        "redis": 1.0,
    }
    unreadable = CpuReading(publisher=2.0, worker_main=None, pool={}, redis_server=None)
    assert unreadable.since(before) == {"publisher": 1.0}


def test_cpu_per_task_is_per_role_with_a_total_only_when_every_role_was_read() -> None:
    every_role = {"publisher": 0.1, "worker_main": 0.2, "pool": 0.3, "redis": 0.4}
    batches = [
        Batch("governed", 1, 100, 1.0, {}, every_role),
        Batch("governed", 2, 100, 1.0, {}, every_role),
    ]
    per_task = cpu_ms_per_task(batches)
    assert per_task == {
        "publisher": 1.0,
        "worker_main": 2.0,
        "pool": 3.0,
        "redis": 4.0,
        "total": 10.0,
    }
    assert set(CPU_ROLES) | {"total"} == set(per_task)
    assert cpu_ms_per_task([Batch("plain", 1, 10, 1.0, {}, {"publisher": 0.01})]) == {
        "publisher": 1.0
    }


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_cpu_and_children_are_read_from_proc() -> None:
    assert (process_cpu_s(os.getpid()) or 0) > 0
    assert process_cpu_s(2**22 + 12345) is None  # above any pid_max: no such process
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in child_pids(os.getpid())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert child.pid not in child_pids(os.getpid())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_tiny_run_measures_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # never flush a shared one
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "governance.bench.celery_bench",
            "--tasks",
            "40",
            "--rounds",
            "2",
            "--store-tasks",
            "100",
            "--scale-tenants",
            "200",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round 2/2 governed" in proc.stdout
    result = json.loads(out.read_text())
    assert result["plain"]["tasks"] == result["governed"]["tasks"] == 40
    assert result["tasks_per_kind"] == 40
    assert [b["round"] for b in result["governed"]["batches"]] == [1, 2]
    assert result["plain"]["tasks_per_s"] > 0
    assert result["governed"]["tasks_per_s"] > 0
    assert result["governed_to_plain_ratio"] > 0
    # the yardstick ran interleaved with them and made its two script calls per task
    assert "round 2/2 round_trips" in proc.stdout
    assert result["round_trips"]["tasks"] == 40
    for batch in result["round_trips"]["batches"]:
        assert batch["script_calls"] >= 2 * batch["tasks"], batch
    assert result["round_trips_to_plain_ratio"] > 0
    assert "bare round trips / plain throughput" in proc.stdout
    # admission and settlement (their audit entries included), counted by the server
    assert result["script_calls_per_governed_task_raw"] >= 2
    assert result["store"]["admit_settle_p50_ms"] > 0
    assert result["store"]["admission_p50_ms_many_tenants"] > 0
    assert result["store"]["redis_cpu_us_per_governed_task"] > 0
    assert "state Redis CPU per governed task" in proc.stdout
    # CPU of every process serving the run: this machine has /proc and a local Redis
    for kind in ("plain", "governed"):
        cpu = result[kind]["cpu_ms_per_task"]
        assert set(cpu) == {*CPU_ROLES, "total"}, cpu
        assert cpu["publisher"] > 0
        assert cpu["total"] == pytest.approx(sum(cpu[role] for role in CPU_ROLES), abs=0.01)
    assert "CPU ms per task, plain/governed" in proc.stdout
