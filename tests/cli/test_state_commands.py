"""govctl against a real Redis (no worker): held tasks, usage, audit, and failure exit codes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import redis

from governance.policy.signing import call_hash
from governance.store.audit import AuditEvent, AuditEventType, AuditLog
from governance.store.audit_seal import AuditSealer
from governance.store.held import HeldStatus, HeldStore, HeldTask
from governance.store.keys import DeploymentKeys, TenantKeys
from governance.store.state import StateStore
from tests.cli.conftest import ROOT, Govctl

AUDIT_KEY = b"cli-test-audit-key"


def held_task(tenant: str, n: int, requested_ms: int, user: str = "carol") -> HeldTask:
    kwargs = {"command": ["echo", str(n)]}
    task_id = f"task-{tenant}-{n:06d}"
    context = {"tenant": tenant, "agent": "bot", "run": "run-1", "user": user}
    return HeldTask(
        task_id=task_id,
        tenant=tenant,
        agent="bot",
        run="run-1",
        user=user,
        task_name="tools.shell",
        args=[],
        kwargs=kwargs,
        context=context,
        action={"kind": "tool", "tool": "shell", "input": kwargs},
        action_name="shell",
        action_class="process.exec",
        tier="act_with_approval",
        reason="held for the test",
        call=call_hash("tools.shell", [], kwargs, context),
        requested_ms=requested_ms,
        expires_ms=requested_ms + 86_400_000,
        envelope={
            "task": "tools.shell",
            "args": [],
            "kwargs": kwargs,
            "options": {"task_id": task_id},
        },
    )


def put(store: HeldStore, task: HeldTask) -> None:
    store.put(task, audit={"tenant": task.tenant, "task_id": task.task_id})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_show_of_an_unknown_task_exits_1_with_a_clear_message(govctl: Govctl) -> None:
    result = govctl("held", "show", "NOPE")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown held task 'NOPE'"
    assert result.stdout == ""


def test_closing_a_run_refuses_an_id_no_context_could_carry(govctl: Govctl) -> None:
    for bad, why in (("", "must not be empty"), ("a b", "may only contain"), ("{x}", "'{'")):
        result = govctl("run", "close", bad, "-t", "acme")
        assert result.returncode == 2, (bad, result.stderr)
        assert why in result.stderr
        assert "Traceback" not in result.stderr
    assert govctl("run", "close", "r-1", "-t", "acme").returncode == 0


def test_an_unreachable_store_exits_3_promptly(govctl: Govctl) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    env = {
        "GOVERNANCE_BROKER_URL": url,
        "GOVERNANCE_STATE_REDIS_URL": url,
        "GOVERNANCE_STATE_TIMEOUT_S": "1",
    }
    for args in (("usage", "--tenant", "acme"), ("held", "list"), ("audit", "verify")):
        started = time.monotonic()
        result = govctl(*args, env=env, process=True)
        elapsed = time.monotonic() - started
        assert result.returncode == 3, (args, result.stderr)
        assert "unavailable" in result.stderr
        assert "Traceback" not in result.stderr
        print(f"govctl {' '.join(args)} with Redis down: exit 3 after {elapsed:.2f}s")


def test_audit_verify_on_an_empty_stream_passes(govctl: Govctl) -> None:
    result = govctl("audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "0 entries verified" in result.stdout


def test_audit_verify_names_a_tampered_entry(
    govctl: Govctl, state: StateStore, redis_client: redis.Redis
) -> None:
    log = AuditLog(state, AuditSealer(AUDIT_KEY))
    ids = [
        log.append(AuditEvent(type=AuditEventType.HELD, tenant="acme", task_id=f"t{i}"))[0]
        for i in range(4)
    ]
    assert govctl("audit", "verify").returncode == 0
    tail = json.loads(govctl("audit", "tail", "-n", "2", "--json").stdout)
    assert [e["task_id"] for e in tail] == ["t2", "t3"]
    stream = TenantKeys("acme").audit
    entries = redis_client.xrange(stream)
    redis_client.delete(stream)
    for entry_id, fields in entries:
        if entry_id.decode() == ids[1]:
            fields[b"tenant"] = b"someone-else"
        redis_client.xadd(stream, fields, id=entry_id)
    result = govctl("audit", "verify")
    assert result.returncode == 4
    assert ids[1] in result.stderr
    assert "altered" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(govctl("audit", "verify", "--json").stdout)
    (acme,) = [c for c in report["chains"] if c["chain"] == "acme"]
    assert [b["entry"] for b in acme["breaks"]] == [ids[1]]
    assert acme["checked"] == 3


def test_usage_prints_json_and_refuses_unknown_tenants(govctl: Govctl) -> None:
    result = govctl("usage", "--tenant", "acme", "--run", "run-7", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["period"] for row in data["usage"]] == ["day", "month", "run"]
    assert data["usage"][0]["budget"] == {"tokens": 100000, "cost_usd": 5.0}
    assert {c["check"] for c in data["long_running"]} >= {"discovered_step_limit"}
    everyone = json.loads(govctl("usage", "--json").stdout)
    assert {row["tenant"] for row in everyone["usage"]} == {"acme", "beta"}
    unknown = govctl("usage", "--tenant", "nobody")
    assert unknown.returncode == 1
    assert "unknown tenant 'nobody'" in unknown.stderr
    assert govctl("usage", "--run", "run-7").returncode == 2  # a run needs its tenant


def test_submit_holds_shell_and_reviewers_decide(
    govctl: Govctl, reviewer_keys: dict[str, Path]
) -> None:
    submitted = govctl(
        "submit", "tool", "shell", "-t", "acme", "-a", "planner", "--run", "r1", "-u", "carol",
        "-i", 'command:=["ls"]', "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task_id"]
    assert json.loads(submitted.stdout)["state"] == "HELD"

    listed = json.loads(govctl("held", "list", "--tenant", "acme", "--json").stdout)
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]
    shown = json.loads(govctl("held", "show", task_id, "--json").stdout)
    assert (shown["status"], shown["user"], shown["kwargs"]) == (
        "held",
        "carol",
        {"command": ["ls"]},
    )

    def key(name: str) -> str:
        return str(reviewer_keys[name])

    stranger = govctl("held", "approve", task_id, "--key", key("mallory"))
    assert stranger.returncode == 1
    assert "this key is not a reviewer's of tenant 'acme'" in stranger.stderr
    first = govctl("held", "approve", task_id, "--key", key("alice"), "--reason", "looks fine")
    assert first.returncode == 0, first.stderr
    assert "1 of 2" in first.stdout
    again = govctl("held", "approve", task_id, "--key", key("alice"))
    assert again.returncode == 1
    assert "already approved" in again.stderr
    rejected = govctl("held", "reject", task_id, "--key", key("bob"), "--reason", "not today")
    assert rejected.returncode == 0, rejected.stderr
    after = json.loads(govctl("held", "show", task_id, "--json").stdout)
    assert after["status"] == "rejected"
    assert [d["reviewer"] for d in after["decisions"]] == ["alice", "bob"]
    late = govctl("held", "approve", task_id, "--key", key("bob"))
    assert late.returncode == 1
    assert "not held (status: rejected)" in late.stderr


def test_submit_of_a_denied_action_exits_1(govctl: Govctl) -> None:
    result = govctl("submit", "tool", "delete_file", "-t", "beta", "-a", "bot", "--run", "r",
                    "-i", "path=x")  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: denied: tool 'delete_file' is not allowed for tenant 'beta'"
    )
    bad_context = govctl("submit", "tool", "echo", "-t", "acme", "-a", "a b", "--run", "r")
    assert bad_context.returncode == 2


def test_submit_task_enqueues_any_governed_task_by_name(govctl: Govctl) -> None:
    submitted = govctl(
        "submit", "task", "tools.shell", "-t", "acme", "-a", "planner", "--run", "r1",
        "-u", "carol", "-i", 'command:=["ls"]', "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["state"] == "HELD"
    shown = json.loads(
        govctl("held", "show", json.loads(submitted.stdout)["task_id"], "--json").stdout
    )
    assert (shown["action"]["tool"], shown["kwargs"]) == ("shell", {"command": ["ls"]})

    unknown = govctl("submit", "task", "tools.nope", "-t", "acme", "-a", "bot", "--run", "r")
    assert unknown.returncode == 1
    assert "no governed task named 'tools.nope' in the app; governed tasks: " in unknown.stderr
    assert "tools.echo" in unknown.stderr
    assert "llm.complete" in unknown.stderr
    no_tool = govctl("submit", "tool", "nope", "-t", "acme", "-a", "bot", "--run", "r")
    assert no_tool.returncode == 1
    assert "unknown tool 'nope': no governed task of the app is that tool" in no_tool.stderr
    bad_arg = govctl("submit", "task", "tools.echo", "-t", "acme", "-a", "b", "--run", "r",
                     "--arg", "{not json")  # fmt: skip
    assert bad_arg.returncode == 2
    assert "is not JSON" in bad_arg.stderr


def test_listing_all_tenants_follows_cursors_over_every_task_once(
    govctl: Govctl, state: StateStore
) -> None:
    store = HeldStore(state)
    base = 1_700_000_000_000
    tasks = [held_task("acme", i, base + 10 * i) for i in range(7)]
    tasks += [held_task("beta", i, base + 10 * i + 5) for i in range(4)]
    tasks += [held_task("beta", i + 10, base + 3) for i in range(3)]  # at the same time
    for task in tasks:
        put(store, task)
    seen: list[str] = []
    cursor: list[str] = []
    for _ in range(10):
        page = json.loads(govctl("held", "list", "--limit", "4", "--json", *cursor).stdout)
        assert len(page["tasks"]) <= 4
        assert page["total"] == len(tasks)
        seen += [t["task_id"] for t in page["tasks"]]
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]
    expected = sorted(tasks, key=lambda t: (t.requested_ms, t.tenant, t.task_id))
    assert seen == [t.task_id for t in expected]
    table = govctl("held", "list", "--limit", "4")
    assert "more: govctl held list" in table.stderr
    assert "--cursor m." in table.stderr
    wrong = govctl("held", "list", "--tenant", "acme", "--cursor", cursor[1])
    assert wrong.returncode == 2


def _commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def test_first_page_of_many_held_tasks_is_o_page(
    govctl: Govctl, state: StateStore, redis_client: redis.Redis
) -> None:
    store = HeldStore(state)
    base = 1_700_000_000_000
    put(store, held_task("beta", 0, base - 1))  # a second tenant, for the all-tenants listing
    counts: dict[tuple[str, int], int] = {}
    # Warm up: the first listing loads the scripts into the server, which the others need not.
    assert govctl("held", "list", "--limit", "1").returncode == 0
    made = 0
    for total in (1_000, 10_000):
        started = time.monotonic()
        while made < total:
            put(store, held_task("acme", made, base + made))
            made += 1
        setup_s = time.monotonic() - started
        assert store.count("acme", HeldStatus.HELD) == total
        for scope in (("--tenant", "acme"), ()):
            before = _commands(redis_client)
            started = time.monotonic()
            result = govctl("held", "list", *scope, "--limit", "20", "--json")
            elapsed = time.monotonic() - started
            counts[scope[-1] if scope else "all", total] = _commands(redis_client) - before
            assert result.returncode == 0, result.stderr
            page = json.loads(result.stdout)
            first = 0 if scope else 1
            expected = [f"task-acme-{i:06d}" for i in range(20 - first)]
            assert [t["task_id"] for t in page["tasks"]][first:] == expected
            assert page["total"] == total + (0 if scope else 1)
            assert page["next_cursor"]
            print(
                f"{total} held (setup {setup_s:.1f}s), held list {' '.join(scope) or '(all)'}: "
                f"first page in {elapsed:.2f}s (process start included), "
                f"{counts[scope[-1] if scope else 'all', total]} Redis commands"
            )
    assert counts["acme", 1_000] == counts["acme", 10_000], counts
    assert counts["all", 1_000] == counts["all", 10_000], counts
    # a range, 20 hashes and a count, the client's hello (and per tenant when listing all)
    assert counts["acme", 10_000] < 40, counts
    assert counts["all", 10_000] < 80, counts


def test_approvals_with_the_broker_down_are_recorded_and_left_to_the_reconciler(
    govctl: Govctl, reviewer_keys: dict[str, Path], redis_client: redis.Redis
) -> None:
    """The state Redis is up, the broker is not: both approvals are recorded and the release is
    left to the reconciler (the ledger has it), without Celery's reconnect loops. A monitor is
    watching (a worker's events flag), so govctl tries to send the task-held event and says it
    could not."""
    redis_client.set(DeploymentKeys.events_on, "a-worker", px=120_000)
    submitted = govctl(
        "submit", "tool", "shell", "-t", "acme", "-a", "planner", "--run", "r1", "-u", "carol",
        "-i", 'command:=["ls"]', "--json",
    )  # fmt: skip
    task_id = json.loads(submitted.stdout)["task_id"]
    down = {"GOVERNANCE_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    first = govctl("held", "approve", task_id, "--key", str(reviewer_keys["alice"]), env=down)
    assert first.returncode == 0, first.stderr
    assert "could not send the task-held event" in first.stderr
    second = govctl("held", "approve", task_id, "--key", str(reviewer_keys["bob"]), env=down)
    assert second.returncode == 0, second.stderr
    assert f"released task {task_id} is published by the reconciler" in second.stderr
    for result in (first, second):
        assert "Retry (" not in result.stderr
        assert "Traceback" not in result.stderr
    assert json.loads(govctl("held", "show", task_id, "--json").stdout)["status"] == "released"


def test_govctl_operates_an_app_governed_by_its_task_class_alone(
    govctl: Govctl, redis_url: str
) -> None:
    """``Celery("own", task_cls=GovernedTask)`` (no ``govern(app)``): govctl finalizes the app
    as a worker does, which governs it, and reads its state."""
    own = {
        "GOVERNANCE_APP": "tests.e2e.own_app:app",
        "GOVERNANCE_CONFIG_PATH": str(ROOT / "tests" / "e2e" / "own-policy.yaml"),
    }
    for args in (("status",), ("held", "list"), ("audit", "verify")):
        result = govctl(*args, env=own)
        assert result.returncode == 0, (args, result.stderr)


def test_an_app_that_cannot_be_imported_names_governance_app(govctl: Govctl) -> None:
    result = govctl("status", env={"GOVERNANCE_APP": "no_such_module_here:app"})
    assert result.returncode == 5
    assert "'no_such_module_here:app' (GOVERNANCE_APP)" in result.stderr
    assert "set GOVERNANCE_APP to your app's module:attribute" in result.stderr
