"""A team's own tasks, governed: the README's example as written, Celery's publishing calls and
retry idioms, on real workers serving apps that are not the example deployment.

``own_app`` is governed by its task class alone (``Celery(task_cls=GovernedTask)``); its worker
consumes its own queue, with its own broker (a Redis database, or a RabbitMQ vhost) and state
database, next to the session's worker. The README's example runs on Redis, as it is written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery import chain, group
from celery.exceptions import TimeLimitExceeded

from governance.embedded import EmbeddedRedis
from governance.integration import (
    ActionDenied,
    ActionFailed,
    MissingContext,
    governance_context,
    runtime_for,
)
from governance.store import Period, read_usage
from governance.store.audit import AuditEntry
from tests.e2e.conftest import (
    WorkerProcess,
    consuming_paused,
    fresh_broker_url,
    queue_depth,
    wait_until,
)

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TENANT = "own-acme"


def _db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def _without_settings(environ: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in environ.items()
        if not k.startswith(("GOVERNANCE_", "CELERY_")) and k != "REDIS_URL"
    }


@pytest.fixture(scope="module")
def own_env(
    broker_kind: str,
    broker: EmbeddedRedis,
    state_server: EmbeddedRedis,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    with fresh_broker_url(broker_kind, request, "own") as broker_url:
        yield {
            "CELERY_BROKER_URL": broker_url if broker_kind != "redis" else _db(broker.url, 2),
            "CELERY_RESULT_BACKEND": _db(broker.url, 3),
            "GOVERNANCE_STATE_REDIS_URL": _db(state_server.url, 4),
            "GOVERNANCE_CONFIG_PATH": str(HERE / "own-policy.yaml"),
            "GOVERNANCE_AUDIT_KEY": "own-audit-key",
            "GOVERNANCE_WORKSPACE_DIR": str(tmp_path_factory.mktemp("own-workspace")),
        }


@pytest.fixture(scope="module")
def own(own_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """``tests.e2e.own_app``, imported here under its settings, and a worker serving it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith(("GOVERNANCE_", "CELERY_"))]:
            patch.delenv(name)
        for name, value in own_env.items():
            patch.setenv(name, value)
        # Imported afresh under this half's settings (the module's app reads them once).
        sys.modules.pop("tests.e2e.own_app", None)
        own_app = importlib.import_module("tests.e2e.own_app")

        redis.Redis.from_url(own_env["GOVERNANCE_STATE_REDIS_URL"]).flushdb()
        worker = WorkerProcess(
            {**_without_settings(dict(os.environ)), **own_env, "PYTHONPATH": str(ROOT)},
            tmp_path_factory.mktemp("own-worker") / "worker.log",
            name="own",
            app_module="tests.e2e.own_app",
            queues="own",
        )
        worker.start(own_app.app)
        try:
            yield own_app
        except BaseException:
            print(worker.log_tail())
            raise
        finally:
            worker.stop()
            own_app.app.close()


def _entries(app: Any, task_id: str) -> list[AuditEntry]:
    return [
        e for e in runtime_for(app).audit_log.records(TENANT) if e.fields.get("task_id") == task_id
    ]


def _enqueued_by(app: Any, publish: Any) -> int:
    """How many messages ``publish()`` put on the ``own`` queue (it may raise: expected)."""
    with consuming_paused(app, "own"):
        before = queue_depth(app, "own")
        with contextlib.suppress(MissingContext, ActionDenied):
            publish()
        return queue_depth(app, "own") - before


# -- the README's example, as written -------------------------------------------------------------


def _readme_blocks() -> dict[str, str]:
    """The README's example files: the fenced block after each ``<!-- example: NAME -->``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return dict(found)


#: Three more of publish.py's word count, in its run: one of them is the 4th, refused.
FOURTH_CALL = """
from governance.integration import governance_context
from reports import word_count
with governance_context(tenant="acme", agent="report-bot", run="run-42", user="carol"):
    calls = [word_count.delay("three little words") for _ in range(3)]
for call in calls:
    try:
        print(call.get(timeout=30))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")
"""


def test_the_readme_example_runs_as_written(
    broker: EmbeddedRedis, state_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """The README's own-task section, block by block, as a reader runs it: the files, run.sh
    (a reviewer key made as documented, a worker, the publisher: a denial, a result, a held
    call), then approve.sh in the same shell (held list, approve with alice's key, the result)."""
    blocks = _readme_blocks()
    assert set(blocks) == {"reports.py", "policy.yaml", "publish.py", "run.sh", "approve.sh"}
    app_lines = [line for line in blocks["reports.py"].splitlines() if line.strip()]
    assert len(app_lines) <= 14, "the example stays that small"
    for name in ("reports.py", "policy.yaml", "publish.py"):
        (tmp_path / name).write_text(blocks[name], encoding="utf-8")
    urls = {0: _db(broker.url, 6), 1: _db(state_server.url, 7)}

    def as_here(script: str) -> str:
        for db, url in urls.items():
            script = script.replace(f"redis://127.0.0.1:6379/{db}", url)
        return script

    run_sh = as_here(blocks["run.sh"])
    (tmp_path / "run.sh").write_text(run_sh, encoding="utf-8")
    env = {
        **_without_settings(dict(os.environ)),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    output = tmp_path / "output.txt"
    with output.open("wb") as out:
        # Its own session: the worker it leaves in the background is stopped with the group.
        shell = subprocess.Popen(
            ["bash", "run.sh"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert shell.wait(timeout=120) == 0, output.read_text()
            lines = output.read_text().splitlines()
            assert "3" in lines, output.read_text()
            (denial,) = [line for line in lines if line.startswith("denied: ")]
            assert denial.endswith("interns may not run reports"), denial
            (held,) = [line.split()[1] for line in lines if line.startswith("HELD ")]
            # The key as documented: the private half here only, the public half in the policy.
            assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
            assert "      alice: ed25519:" in (tmp_path / "policy.yaml").read_text()

            # approve.sh, in the same shell: run.sh's variables, the id publish.py printed.
            exports = "\n".join(x for x in run_sh.splitlines() if x.startswith("export "))
            approve = f"{exports}\n{blocks['approve.sh'].replace('ID', held)}"
            done = subprocess.run(
                ["bash", "-c", approve], cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert held in done.stdout  # held list shows it
            assert (
                f"released task {held}: approved by alice (1 of 1 approvals); it runs once now"
            ) in done.stdout
            assert done.stdout.splitlines()[-1] == "sent to ops@example.com", done.stdout

            state = redis.Redis.from_url(urls[1], decode_responses=True)
            entries = [fields for _, fields in state.xrange("gov:{acme}:audit")]
            by_action = {
                action: [f["type"] for f in entries if f.get("action") == action]
                for action in ("reports.word_count", "reports.email")
            }
            assert "authorization_denied" in by_action["reports.word_count"]
            assert "task_finished" in by_action["reports.word_count"]
            email = by_action["reports.email"]
            assert email == ["held", "released", "admitted", "task_finished"], email

            # The limit nobody wrote down, as the README says: the same call a 4th time in run-42.
            again = subprocess.run(
                ["bash", "-c", f"{exports}\npython -c '{FOURTH_CALL}'"], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert again.returncode == 0, again.stdout + again.stderr
            assert sorted(again.stdout.splitlines()) == [
                "3", "3", "LimitExceeded: same_step_loop exceeded: 4 / 3 (133%)",
            ], again.stdout  # fmt: skip
        finally:
            _stop_group(shell.pid)


def _stop_group(pgid: int) -> None:
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        os.killpg(pgid, sig)
        try:
            wait_until(gone, timeout_s=20, what="the example's worker to stop", poll_s=0.1)
            return
        except AssertionError:
            continue


# -- publishing with Celery's own calls -----------------------------------------------------------


def test_delay_inside_a_context_runs_and_returns_the_result(own: ModuleType) -> None:
    with governance_context(tenant=TENANT, agent="writer", run="run-delay"):
        result = own.upper.delay("governed")
    assert result.get(timeout=30) == "GOVERNED"

    # The settlement and its audit entry are written as the result is stored: read a moment later.
    def settled() -> list[AuditEntry] | None:
        found = _entries(own.app, result.id)
        return found if len(found) >= 2 else None

    entries = wait_until(settled, timeout_s=10, what="the task's settlement in the audit log")
    assert [e.fields["type"] for e in entries] == ["admitted", "task_finished"], entries
    assert {e.fields["run"] for e in entries} == {"run-delay"}


def test_delay_outside_any_context_fails_at_once_and_enqueues_nothing(own: ModuleType) -> None:
    with pytest.raises(MissingContext, match=r"with governance_context\(tenant=\.\.\."):
        own.upper.delay("no context")
    assert _enqueued_by(own.app, lambda: own.upper.delay("no context")) == 0

    def allowed() -> Any:
        with governance_context(tenant=TENANT, agent="writer", run="run-probe"):
            return own.upper.delay("the probe counts")

    assert _enqueued_by(own.app, allowed) == 1  # the count sees a message that is published


def test_a_denied_action_raises_at_publish_and_nothing_reaches_the_broker(
    own: ModuleType,
) -> None:
    def denied() -> Any:
        with governance_context(tenant=TENANT, agent="writer", run="run-denied"):
            return own.secret.apply_async(("classified",), task_id="denied-at-publish")

    with pytest.raises(ActionDenied, match=r"own\.secret"):
        denied()
    assert _enqueued_by(own.app, denied) == 0
    state = runtime_for(own.app).state.client
    assert not state.exists(f"gov:{{{TENANT}}}:task:denied-at-publish")


def test_a_shadowed_call_shows_what_it_would_run_with_its_secrets_redacted(
    own: ModuleType,
) -> None:
    with governance_context(tenant=TENANT, agent="watcher", run="run-shadow"):
        result = own.lookup.delay("weather", api_key="sk-live-123")
    shown = result.get(timeout=30)
    assert shown["governance"] == "shadowed"
    assert shown["would_run"]["input"] == {"query": "weather", "api_key": "***"}
    (entry,) = _entries(own.app, result.id)
    assert entry.fields["type"] == "shadowed"
    assert "sk-live-123" not in json.dumps(entry.fields)
    assert json.loads(entry.fields["detail"])["would_run"]["input"]["api_key"] == "***"


def test_a_chain_of_two_runs_with_the_context_on_both(own: ModuleType) -> None:
    with governance_context(tenant=TENANT, agent="chainer", run="run-chain"):
        result = chain(own.upper.s("chain"), own.count.s()).apply_async()
    assert result.get(timeout=30) == 5
    first, second = result.parent.id, result.id
    for task_id in (first, second):
        entries = _entries(own.app, task_id)
        assert [e.fields["type"] for e in entries] == ["admitted", "task_finished"]
        assert {(e.fields["agent"], e.fields["run"]) for e in entries} == {("chainer", "run-chain")}


@pytest.mark.both_brokers
def test_a_group_of_five_respects_the_tenant_concurrency(own: ModuleType) -> None:
    """Concurrency 2, four worker processes, five tasks of 600 ms: at most two at once."""
    with governance_context(tenant=TENANT, agent="grouper", run="run-group"):
        result = group(own.stamp.s(f"g{i}", 600) for i in range(5)).apply_async()
    runs = result.get(timeout=60)
    assert sorted(r["label"] for r in runs) == [f"g{i}" for i in range(5)]
    at_once = max(sum(1 for o in runs if o["start"] <= r["start"] < o["end"]) for r in runs)
    assert at_once == 2, runs


@pytest.mark.both_brokers
def test_a_step_that_ignores_its_timeout_is_killed_and_settled_by_the_worker(
    own: ModuleType,
) -> None:
    """``own.stubborn`` has a 1 s step timeout and swallows Celery's soft time limit: the pool
    kills it at the hard limit (1 s + 2 s), and the worker's main process settles it (slot and
    reservation released, a ``task_failed`` entry): the tenant's next tasks run."""
    with governance_context(tenant=TENANT, agent="stubborn", run="run-killed"):
        killed = own.stubborn.delay(30_000)
    with pytest.raises(TimeLimitExceeded):
        killed.get(timeout=60)
    wait_until(
        lambda: "task_failed" in [e.fields["type"] for e in _entries(own.app, killed.id)],
        timeout_s=30,
        what="the killed step's settlement",
    )
    (failed,) = [e for e in _entries(own.app, killed.id) if e.fields["type"] == "task_failed"]
    assert "step_timeout: killed at its hard time limit of 3 s" in failed.fields["reason"]
    state = runtime_for(own.app).state
    assert read_usage(state, TENANT, Period.DAY).active_leases == 0
    with governance_context(tenant=TENANT, agent="stubborn", run="run-killed"):
        after = group(own.upper.s(f"after {i}") for i in range(2)).apply_async()
    assert after.get(timeout=30) == ["AFTER 0", "AFTER 1"]


# -- Celery's retry idioms ------------------------------------------------------------------------


def _attempts(app: Any, task_id: str) -> list[int]:
    """The attempts of a task that were admitted (each has its audit entry), in order."""
    return [
        json.loads(e.fields["detail"])["attempt"]
        for e in _entries(app, task_id)
        if e.fields["type"] == "admitted"
    ]


def _retries_scheduled(app: Any, task_id: str) -> list[str]:
    return [
        e.fields["reason"] for e in _entries(app, task_id) if e.fields["type"] == "retry_scheduled"
    ]


@pytest.mark.both_brokers
def test_self_retry_after_a_transient_error_retries_and_succeeds(own: ModuleType) -> None:
    with governance_context(tenant=TENANT, agent="retrier", run="run-retry"):
        result = own.flaky.delay(1)
    assert result.get(timeout=30) == 1
    assert _attempts(own.app, result.id) == [0, 1]
    assert _retries_scheduled(own.app, result.id) == [
        "retry requested by the task: attempt 0 failed; retry in 200 ms"
    ]


def test_self_retry_gives_up_after_max_retries(own: ModuleType) -> None:
    with governance_context(tenant=TENANT, agent="retrier", run="run-give-up"):
        result = own.flaky.delay(5)
    with pytest.raises(ConnectionError, match="attempt 2 failed"):
        result.get(timeout=30)
    assert _attempts(own.app, result.id) == [0, 1, 2]
    assert len(_retries_scheduled(own.app, result.id)) == 2


@pytest.mark.both_brokers
def test_self_retry_past_its_own_max_retries_is_not_retried_by_the_tenant_policy(
    own: ModuleType,
) -> None:
    with governance_context(tenant=TENANT, agent="retrier", run="run-giving-up"):
        result = own.giving_up.delay()
    with pytest.raises(ActionFailed, match="attempt 1 failed"):
        result.get(timeout=30)
    # Its own max_retries (1): two attempts, though the tenant's policy allows three retries.
    assert _attempts(own.app, result.id) == [0, 1]
    assert len(_retries_scheduled(own.app, result.id)) == 1


@pytest.mark.both_brokers
def test_autoretry_for_with_backoff_retries_and_succeeds(own: ModuleType) -> None:
    with governance_context(tenant=TENANT, agent="retrier", run="run-auto"):
        result = own.auto.delay(2)
    assert result.get(timeout=30) == 2
    assert _attempts(own.app, result.id) == [0, 1, 2]
    delays = [re.search(r"retry in (\d+) ms", r) for r in _retries_scheduled(own.app, result.id)]
    assert [int(d.group(1)) for d in delays if d] == [1000, 2000]  # retry_backoff: 1 s, 2 s
