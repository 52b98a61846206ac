"""Governed tasks in Flower: a real `celery flower`, started as documented (the shipped
`config/flowerconfig.py`, basic auth from `FLOWER_BASIC_AUTH`), watches the e2e worker's events
and its HTTP API (`/api/tasks`, `/api/task/info/<id>`, `/api/workers`) and task pages show the
governance states, their reasons, a held call and how to decide it, and no phantom workers.

Flower's state machine (`celery.events.state.Task.event`) turns `task-<x>` into state `<X>`, but
only when the new state does not rank below the current one in `celery.states.PRECEDENCE`.
Every custom state ranks as "unknown", just below FAILURE and above STARTED and RECEIVED.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.integration import ActionDenied, GovernanceHeaders, LimitExceeded
from governance.integration.approvals.reviewers import Reviewers
from governance.integration.runtime import GovernanceRuntime
from governance.policy.context import ActionContext
from governance.store.held import HeldStatus
from tests.e2e.conftest import WorkerProcess, audit_of, to_broker, types_of, wait_until
from tests.e2e.flower_process import FlowerProcess
from tests.e2e.observer import ObserverServer
from tests.govctl_runner import run_govctl
from workers.api import submit_llm, submit_tool

pytestmark = pytest.mark.timeout(180)


def ctx(tenant: str, agent: str = "flower-agent", user: str | None = None) -> ActionContext:
    return ActionContext(tenant=tenant, agent=agent, run="run-flower", user=user)


def headers(context: ActionContext) -> dict[str, object]:
    return GovernanceHeaders(context=context).to_headers()


@pytest.fixture(scope="module")
def flower(
    app: Celery,
    worker: WorkerProcess,
    e2e_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FlowerProcess]:
    env = {**os.environ, **e2e_env}
    env.pop("REDIS_URL", None)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)  # basic auth alone must open the API
    process = FlowerProcess(env, tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        process.start()
        _wait_until_capturing_events(app, process)
        yield process
    finally:
        process.stop()


def _wait_until_capturing_events(app: Celery, flower: FlowerProcess) -> None:
    """Publish probe tasks (in a tenant no test here uses) until Flower shows one succeeded.

    An event sent before Flower's receiver is bound is lost, so a probe that Flower missed is
    replaced by a new one rather than waited for.
    """

    def one_probe_seen() -> bool:
        probe = submit_tool(app, ctx("t-other", agent="flower-probe"), "echo", text="probe")
        try:
            wait_until(
                lambda: _state(flower, probe.id) == "SUCCESS",
                timeout_s=3,
                what="the probe task to succeed in flower",
                poll_s=0.1,
            )
        except AssertionError:
            return False
        return True

    try:
        wait_until(one_probe_seen, timeout_s=60, what="flower to see worker events", poll_s=0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nflower log:\n{flower.log_tail()}") from None


def _state(flower: FlowerProcess, task_id: str) -> str | None:
    task = flower.tasks().get(task_id)
    return task["state"] if task else None


def wait_for_state(
    flower: FlowerProcess, task_id: str, state: str, timeout_s: float = 30
) -> dict[str, Any]:
    """Poll `/api/tasks` until ``task_id`` is listed in ``state``; return its listing."""
    last: list[str | None] = [None]

    def listed() -> dict[str, Any] | None:
        task = flower.tasks().get(task_id)
        last[0] = task["state"] if task else None
        return task if task and task["state"] == state else None

    try:
        task: dict[str, Any] = wait_until(
            listed, timeout_s=timeout_s, what=f"{task_id} to be {state} in flower", poll_s=0.1
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc} (last seen: {last[0]})\nflower log:\n{flower.log_tail()}"
        ) from None
    return task


def info_of(flower: FlowerProcess, task_id: str) -> dict[str, Any]:
    """`/api/task/info` for ``task_id``, once it agrees with `/api/tasks` on the state.

    The two are separate requests, so an event landing between them may make them differ for
    a moment; they must agree again once the task's events stop arriving.
    """

    def agreeing() -> dict[str, Any] | None:
        info = flower.task_info(task_id)
        assert info is not None, f"flower lists {task_id} in /api/tasks but has no info for it"
        return info if info["state"] == _state(flower, task_id) else None

    found: dict[str, Any] = wait_until(
        agreeing, timeout_s=10, what=f"flower's info and list to agree on {task_id}", poll_s=0.1
    )
    return found


def assert_governance_fields(info: dict[str, Any], tenant: str, reason: str) -> None:
    """The governance fields of the event, where Flower's API exposes them.

    Flower 2.2 stores every field of an event on its task object, but its API serializes only
    `Task._fields` (celery's fixed list), so `tenant` and `reason` do not reach `/api/task/info`
    today; a denial's reason does, as the `exception` of the renamed `task-failed` event.
    """
    if "tenant" in info:
        assert info["tenant"] == tenant
    if "reason" in info:
        assert reason in info["reason"]


def test_the_api_needs_basic_auth(flower: FlowerProcess) -> None:
    with flower.client() as anonymous:
        assert anonymous.get("/api/tasks").status_code == 401
        assert anonymous.get("/api/workers").status_code == 401
        assert anonymous.get("/api/task/info/anything").status_code == 401
    with flower.client(auth=(flower.user, "wrong-" + flower.password)) as wrong:
        assert wrong.get("/api/tasks").status_code == 401
    with flower.client(auth=(flower.user, flower.password)) as admin:
        response = admin.get("/api/tasks")
        assert response.status_code == 200
        assert isinstance(response.json(), dict)


def test_denied_shadowed_and_suggested_tasks_show_their_state(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess, workspace: Path
) -> None:
    # DENIED: through the broker (the publisher API would refuse to enqueue it at all).
    denied = to_broker(
        app,
        "tools.write_file",
        {"path": "flower-intern.txt", "content": "x"},
        headers(ctx("t-basic", agent="intern-9")),
    )
    shadowed = submit_tool(
        app, ctx("t-basic", agent="watcher"), "write_file", path="flower-s.txt", content="x"
    )
    suggested = submit_tool(
        app, ctx("t-basic", agent="proposer"), "write_file", path="flower-g.txt", content="x"
    )

    for task_id, state in (
        (denied.id, "DENIED"),
        (shadowed.id, "SHADOWED"),
        (suggested.id, "SUGGESTED"),
    ):
        listed = wait_for_state(flower, task_id, state)
        assert listed["name"] == "tools.write_file"
        assert listed["received"] is not None  # Flower knew it from the broker path
        info = info_of(flower, task_id)
        assert info["name"] == "tools.write_file"
        assert info["succeeded"] is None  # a governance outcome, never reported as success
        assert info["failed"] is None

    denied_info = info_of(flower, denied.id)
    # The reason is in the result column the shipped settings show, for every outcome.
    denied_reason = audit_of(runtime, denied.id)[0].fields["reason"]
    assert denied_reason.endswith("interns may not touch files")
    assert denied_info["result"] == f"denied: {denied_reason}"
    for result in (shadowed, suggested):
        assert str(info_of(flower, result.id)["result"]).startswith(("shadowed: ", "suggested: "))
    assert "ActionDenied" in denied_info["exception"]
    assert "interns may not touch files" in denied_info["exception"]
    assert_governance_fields(denied_info, "t-basic", "interns may not touch files")
    for result in (shadowed, suggested):
        reason = audit_of(runtime, result.id)[0].fields["reason"]
        assert_governance_fields(info_of(flower, result.id), "t-basic", reason)

    # Flower agrees with the result backend and the audit log, and nothing ran.
    with pytest.raises(ActionDenied, match="interns may not touch files"):
        denied.get(timeout=30)
    assert shadowed.get(timeout=30)["governance"] == "shadowed"
    assert suggested.get(timeout=30)["governance"] == "suggested"
    assert types_of(audit_of(runtime, denied.id)) == ["authorization_denied"]
    assert types_of(audit_of(runtime, shadowed.id)) == ["shadowed"]
    assert types_of(audit_of(runtime, suggested.id)) == ["suggested"]
    assert not any((workspace / n).exists() for n in ("flower-s.txt", "flower-g.txt"))


def test_a_task_held_by_the_worker_shows_held(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess
) -> None:
    held = to_broker(
        app,
        "tools.write_file",
        {"path": "flower-held-broker.txt", "content": "b"},
        headers(ctx("t-held", user="dana")),
    )
    listed = wait_for_state(flower, held.id, "HELD")
    # Flower knew the task from the broker (task-received) before the worker held it.
    assert listed["name"] == "tools.write_file"
    assert listed["received"] is not None
    reason = audit_of(runtime, held.id)[0].fields["reason"]
    assert_governance_fields(info_of(flower, held.id), "t-held", reason)
    assert held.state == "HELD"
    assert Reviewers(app, runtime).find(held.id).status is HeldStatus.HELD
    assert "admitted" not in types_of(audit_of(runtime, held.id))


def test_a_task_held_at_publish_time_shows_held(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess
) -> None:
    held = submit_tool(
        app, ctx("t-held", user="dana"), "write_file", path="flower-held-api.txt", content="a"
    )
    assert held.state == "HELD"
    listed = wait_for_state(flower, held.id, "HELD")
    # Never on the broker: Flower knows it only from the publisher's task-held event, which
    # gives it the time it was held as its received time (else it would sort last).
    assert listed["received"] is not None
    assert listed["started"] is None
    reason = audit_of(runtime, held.id)[0].fields["reason"]
    assert_governance_fields(info_of(flower, held.id), "t-held", reason)
    assert types_of(audit_of(runtime, held.id)) == ["held"]


def test_a_rejected_held_task_shows_rejected(
    app: Celery,
    runtime: GovernanceRuntime,
    flower: FlowerProcess,
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    held = submit_tool(
        app, ctx("t-held", user="dana"), "write_file", path="flower-rejected.txt", content="r"
    )
    wait_for_state(flower, held.id, "HELD")
    Reviewers(app, runtime).reject(held.id, keys["alice"], "no")
    assert types_of(audit_of(runtime, held.id)) == ["held", "rejected"]

    # Flower has the task-rejected event once it sets the `rejected` timestamp ...
    info = wait_until(
        lambda: (i := info_of(flower, held.id)) and i["rejected"] is not None and i,
        timeout_s=30,
        what="flower to receive the task-rejected event",
        poll_s=0.1,
    )
    assert_governance_fields(info, "t-held", "rejected by alice: no")
    # ... and from then on must list it as REJECTED.
    assert info["state"] == "REJECTED"
    assert wait_for_state(flower, held.id, "REJECTED", timeout_s=2)


def test_deferred_tasks_show_deferred_until_they_succeed(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess, observer: ObserverServer
) -> None:
    """Concurrency 1 and four slow calls on four worker processes: three wait (DEFERRED).

    A deferred task is re-published with the same id; its later task-received and task-started
    rank below DEFERRED, so Flower keeps showing DEFERRED until task-succeeded. The test polls
    `/api/tasks` throughout and records every state each task is listed in: exactly the tasks the
    audit log says were deferred must have been listed as DEFERRED, and all end SUCCESS.
    """
    url = f"{observer.base_url}/slow?key=flower-conc&ms=800"
    results = [submit_tool(app, ctx("t-conc"), "http_get", url=url) for _ in range(4)]
    seen: dict[str, list[str]] = {r.id: [] for r in results}

    reasons: list[str] = []

    def all_succeeded() -> bool:
        listed = flower.tasks()
        for task_id, states in seen.items():
            state = listed.get(task_id, {}).get("state")
            if state and (not states or states[-1] != state):
                states.append(state)
            if state == "DEFERRED":
                reasons.append(str(listed[task_id]["result"]))
        return all(states and states[-1] == "SUCCESS" for states in seen.values())

    try:
        wait_until(all_succeeded, timeout_s=90, what="all four tasks to succeed in flower")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}\nflower log:\n{flower.log_tail()}") from None
    for result in results:
        assert result.get(timeout=30)["status"] == 200

    deferred = {r.id for r in results if "waiting" in types_of(audit_of(runtime, r.id))}
    shown_deferred = {task_id for task_id, states in seen.items() if "DEFERRED" in states}
    assert deferred, "with concurrency 1, some of the four tasks must have been deferred"
    assert reasons
    assert all(r.startswith("deferred: ") and "concurrency" in r for r in reasons), reasons
    assert shown_deferred == deferred, seen
    for task_id in deferred:
        # DEFERRED, then (the re-published message ran) SUCCESS, and nothing after.
        assert seen[task_id][seen[task_id].index("DEFERRED") :] == ["DEFERRED", "SUCCESS"], seen
        assert info_of(flower, task_id)["succeeded"] is not None


def test_a_held_call_shows_its_reason_call_context_and_how_to_decide_it(
    app: Celery,
    runtime: GovernanceRuntime,
    flower: FlowerProcess,
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    """What a reviewer needs, on the task's row, its API record and its page."""
    held = submit_tool(
        app, ctx("t-quorum", user="dana"), "write_file", path="flower-call.txt", content="c"
    )
    listed = wait_for_state(flower, held.id, "HELD")
    reason = audit_of(runtime, held.id)[0].fields["reason"]
    # The task list's result column starts with the reason.
    assert listed["result"].splitlines()[0] == f"held: {reason}"
    assert listed["received"] is not None
    info = info_of(flower, held.id)
    assert info["args"] == "[]"
    assert info["kwargs"] == "{'path': 'flower-call.txt', 'content': 'c'}"
    result = info["result"]
    for line in (
        "action: write_file; tenant: t-quorum; agent: flower-agent; run: run-flower",
        "requested by: dana",
        "approvals: 0 of 2 (reviewers: alice, bob, carol)",
        f"approve: govctl held approve {held.id} --key PATH",
        f"reject:  govctl held reject {held.id} --key PATH --reason '...'",
    ):
        assert line in result.splitlines(), (line, result)
    assert info["expires"] is not None
    assert any(line == f"expires: {info['expires']}" for line in result.splitlines())
    page = flower.task_page(held.id)
    for text in ("flower-call.txt", "requested by: dana", f"govctl held approve {held.id}"):
        assert text in page, text

    # One approval of two: the page shows it, the task is still held.
    Reviewers(app, runtime).approve(held.id, keys["alice"], "ok")
    wait_until(
        lambda: "approvals: 1 of 2" in str((info_of(flower, held.id) or {}).get("result")),
        timeout_s=30,
        what="flower to show the first approval",
        poll_s=0.1,
    )
    assert info_of(flower, held.id)["state"] == "HELD"


def test_secrets_in_a_held_call_are_redacted(
    e2e_env: dict[str, str], runtime: GovernanceRuntime, flower: FlowerProcess
) -> None:
    """A team's own governed task whose call carries a credential, held at publish: Flower shows
    its arguments with the credential's value as ``***``, on the API and on the page."""
    from governance.integration import GovernedTask, govern, governance_context
    from governance.policy.engine import Policy
    from governance.settings import GovernanceSettings

    settings = GovernanceSettings(
        **{k.removeprefix("GOVERNANCE_").lower(): v for k, v in e2e_env.items()}
    )
    policy = Policy.from_dict(
        {
            "version": 1,
            "tools": {"ops.deploy": "process.exec"},
            "tenants": {
                "t-held": {
                    "allowed_tools": ["ops.deploy"],
                    "tiers": {"actions": {"ops.deploy": "act_with_approval"}},
                }
            },
        }
    )
    own = Celery("flower-secrets", broker=settings.broker_url, backend=settings.backend_url)
    govern(own, settings, policy)

    @own.task(name="ops.deploy", base=GovernedTask, shared=False)
    def deploy(service: str, api_key: str, options: dict[str, str]) -> str:
        return service

    secret = "sk-live-do-not-show"
    with governance_context(tenant="t-held", agent="deployer", run="run-flower", user="dana"):
        held = deploy.delay("billing", api_key=secret, options={"password": secret, "x": "1"})
    try:
        assert held.state == "HELD"
        wait_for_state(flower, held.id, "HELD")
        info = info_of(flower, held.id)
        assert info["args"] == "['billing']"
        assert info["kwargs"] == "{'api_key': '***', 'options': {'password': '***', 'x': '1'}}"
        assert secret not in str(info)
        page = flower.task_page(held.id)
        assert "billing" in page
        assert secret not in page
    finally:
        own.close()


def test_a_denial_at_publish_time_shows_denied_with_its_reason(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess
) -> None:
    """Nothing reaches the broker, yet Flower lists the task (the id the audit entry has)."""
    with pytest.raises(ActionDenied, match="interns may not touch files"):
        submit_tool(app, ctx("t-basic", agent="intern-7"), "write_file", path="x", content="x")
    (entry,) = [
        e
        for e in runtime.audit_log.records("t-basic")
        if e.fields.get("type") == "authorization_denied" and e.fields.get("agent") == "intern-7"
    ]
    task_id = entry.fields["task_id"]
    listed = wait_for_state(flower, task_id, "DENIED")
    assert listed["name"] == "tools.write_file"
    assert listed["received"] is not None
    reason = entry.fields["reason"]
    assert reason.endswith("interns may not touch files")
    assert listed["result"] == f"denied: {reason} (tenant t-basic, action write_file)"
    info = info_of(flower, task_id)
    assert info["kwargs"] == "{'path': 'x', 'content': 'x'}"
    assert "interns may not touch files" in info["exception"]


def test_govctl_calls_leave_no_phantom_workers(
    app: Celery,
    runtime: GovernanceRuntime,
    flower: FlowerProcess,
    worker: WorkerProcess,
    e2e_env: dict[str, str],
) -> None:
    """Ten `govctl submit` calls, each sending Flower an event from a process of its own (five
    held, five denied at publish): Flower's workers stay the real ones."""
    from tests.e2e.test_e2e_govctl import govctl

    before = flower.workers()
    assert worker.node_name in before
    submitted = []
    for n in range(10):
        agent = "cli-agent" if n % 2 == 0 else f"intern-{n}"
        tenant = "t-held" if n % 2 == 0 else "t-basic"
        done = govctl(
            e2e_env, "submit", "tool", "write_file", "-t", tenant, "-a", agent,
            "--run", "run-phantom", "-u", "dana", "-i", f"path=phantom-{n}.txt",
            "-i", "content=x", "--json",
        )  # fmt: skip
        if n % 2 == 0:
            assert done.returncode == 0, done.stderr
            submitted.append((json.loads(done.stdout)["task_id"], "HELD"))
        else:
            assert done.returncode == 1, done.stderr
    denied = [
        e.fields["task_id"]
        for e in runtime.audit_log.records("t-basic")
        if e.fields.get("run") == "run-phantom"
    ]
    submitted += [(task_id, "DENIED") for task_id in denied]
    assert len(submitted) == 10
    for task_id, state in submitted:
        wait_for_state(flower, task_id, state)
    # Each sender left (worker-offline) right after its event: once Flower has the events,
    # it lists exactly the workers it listed before.
    try:
        wait_until(
            lambda: set(flower.workers()) == set(before),
            timeout_s=10,
            what="flower's workers to be the real ones",
            poll_s=0.1,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {flower.workers()} (before: {before})") from None
    assert flower.workers()[worker.node_name] is True


# -- in a real browser ----------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "needs a headless browser: apt-get install -y chromium (Debian's package)"


def _browser() -> str:
    found = os.environ.get("GOVERNANCE_TEST_BROWSER") or next(
        (path for name in BROWSERS if (path := shutil.which(name))), None
    )
    if not found:
        pytest.skip(INSTALL_HINT)
    return found


def _chromium(browser: str, url: str, profile: Path, *extra: str) -> str:
    """``url`` in headless Chromium, after its scripts (and their requests) ran: stdout."""
    done = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--window-size=1400,900", "--virtual-time-budget=15000", *extra, url,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Table(HTMLParser):
    """The rows of ``#tasks-table`` (cell texts, and each cell's classes), and the state
    filter buttons, from a page's DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self.filters: list[str] = []
        self._in_body = False
        self._cell: list[str] | None = None
        self._cell_class = ""
        self._button = False
        self._button_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table" and found.get("id") == "tasks-table":
            self._in_body = False
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body and self.rows:
            self._cell, self._cell_class = [], found.get("class") or ""
        elif tag == "button" and "task-state-filter" in (found.get("class") or ""):
            self._button, self._button_text = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._cell_class))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "button" and self._button:
            self.filters.append("".join(self._button_text).strip())
            self._button = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._button:
            self._button_text.append(data)


def test_the_task_list_in_a_real_browser(
    app: Celery,
    runtime: GovernanceRuntime,
    flower: FlowerProcess,
    observer: ObserverServer,
    keys: dict[str, Ed25519PrivateKey],
    tmp_path: Path,
) -> None:
    """Flower's task list and pages in headless Chromium, as an operator sees them: a held
    task's reason in full, a waiting task without a Started time, readable times (REJECTED's
    too), and no publisher posing as a worker. A screenshot is kept in the test's folder."""
    browser = _browser()
    held = submit_tool(
        app, ctx("t-quorum", agent="flower-browser", user="dana"), "write_file",
        path="flower-browser-held.txt", content="b",
    )  # fmt: skip
    rejected = submit_tool(
        app, ctx("t-held", agent="flower-browser", user="dana"), "write_file",
        path="flower-browser-rejected.txt", content="r",
    )  # fmt: skip
    wait_for_state(flower, rejected.id, "HELD")
    Reviewers(app, runtime).reject(rejected.id, keys["alice"], "not this one")
    # A slow call holds t-conc's only slot; the next, sent straight to the broker (the worker
    # decides), waits for it: DEFERRED, and not started.
    slow = submit_tool(
        app, ctx("t-conc", agent="flower-browser"), "http_get",
        url=f"{observer.base_url}/slow?key=flower-browser&ms=8000",
    )  # fmt: skip
    wait_until(
        lambda: (flower.tasks().get(slow.id) or {}).get("state") == "STARTED",
        timeout_s=30, what="the slow call to start", poll_s=0.1,
    )  # fmt: skip
    waiting = to_broker(
        app, "tools.echo", {"text": "after the slow one"}, headers(ctx("t-conc", "flower-browser"))
    )
    for task_id, state in ((held.id, "HELD"), (rejected.id, "REJECTED"), (waiting.id, "DEFERRED")):
        wait_for_state(flower, task_id, state)

    profile = tmp_path / "profile"
    base = f"http://{flower.user}:{flower.password}@127.0.0.1:{flower.port}"
    listing = f"{base}/tasks?name=tools."
    dom = _chromium(browser, listing, profile, "--dump-dom")
    screenshot = tmp_path / "flower-tasks.png"
    _chromium(browser, listing, profile, f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
    table = _Table()
    table.feed(dom)
    assert {"HELD", "DEFERRED", "DENIED", "REJECTED", "SHADOWED", "SUGGESTED"} <= set(
        table.filters
    ), table.filters
    columns = ["name", "uuid", "state", "tenant", "result", "received", "started", "runtime",
               "worker"]  # fmt: skip
    rows = {}
    for cells in table.rows:
        if len(cells) == len(columns):
            row = dict(zip(columns, cells, strict=True))
            rows[row["uuid"][0][:36]] = row
    for task_id in (held.id, rejected.id, waiting.id):
        assert task_id in rows, (task_id, sorted(rows))

    reason = audit_of(runtime, held.id)[0].fields["reason"]
    text, classes = rows[held.id]["result"]
    assert text == f"held: {reason}"  # the first line of the result, whole
    assert "governance-reason" in classes  # shown wrapped, not cut at 400 px
    assert "overflow-auto" not in classes
    assert rows[held.id]["worker"][0] == ""  # held at publish: no worker, no publisher
    assert rows[held.id]["tenant"][0] == "t-quorum"
    assert rows[rejected.id]["result"][0].startswith("rejected: rejected by alice: not this one")
    assert rows[waiting.id]["state"][0] == "DEFERRED"
    assert rows[waiting.id]["started"][0] == ""  # it waits: not started
    assert rows[waiting.id]["result"][0].startswith("deferred: ")
    for row in (rows[held.id], rows[waiting.id]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", row["received"][0]), row

    # The rejected task's page: its time is a date, not an epoch.
    page = _chromium(browser, f"{base}/task/{rejected.id}", profile, "--dump-dom")
    after = page.split(">Rejected</dt>", 1)[1]
    shown = html.unescape(re.sub(r"<[^>]+>", " ", after.split("</dd>", 1)[0])).strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown), shown
    # The workers page: only the real worker.
    workers = _chromium(browser, f"{base}/workers", profile, "--dump-dom")
    assert "governance-publisher" not in workers
    assert slow.get(timeout=60)["status"] == 200
    assert waiting.get(timeout=60) is not None


def test_a_limit_failure_shows_its_reason_and_policy_setting(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess
) -> None:
    """A task over a budget on its own fails (FAILURE): Flower's result column says why, and
    which setting of the policy it ran into."""
    over = submit_llm(
        app, ctx("t-budget", agent="flower-limits"), provider="fake", model="fake-small",
        messages=[{"role": "user", "content": "[[fill]] too much"}], max_tokens=5000,
    )  # fmt: skip
    with pytest.raises(LimitExceeded, match="token_limit exceeded") as failed:
        over.get(timeout=30)
    listed = wait_for_state(flower, over.id, "FAILURE")
    assert listed["result"] == f"limit: {failed.value} (policy: budgets[].tokens)"


def test_each_row_names_its_tenant_and_the_tenants_page_shows_what_govctl_sets(
    app: Celery, runtime: GovernanceRuntime, flower: FlowerProcess, e2e_env: dict[str, str]
) -> None:
    """The task list's tenant column, from the worker's own events; the Tenants page (and its
    JSON) shows per tenant what ``govctl status`` shows, a pause and a weight override set with
    ``govctl`` included, and Flower's login guards it."""
    done = submit_tool(app, ctx("t-basic"), "echo", text="whose task")
    done.get(timeout=30)

    def row() -> dict[str, Any] | None:
        rows = [r for r in flower.datatable() if r["uuid"] == done.id and r["state"] == "SUCCESS"]
        return rows[0] if rows else None

    assert wait_until(row, timeout_s=20, what="the task's row")["tenant"] == "t-basic"

    env = {k: v for k, v in e2e_env.items() if k.startswith("GOVERNANCE_")}
    for args in (("tenants", "pause", "t-budget"), ("limits", "override", "t-budget", "weight=3")):
        result = run_govctl(*args, env=env)
        assert result.returncode == 0, result.stderr
    status = run_govctl("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    expected = {r["tenant"]: r for r in json.loads(status.stdout)["tenants"]}

    shown = {r["tenant"]: r for r in flower.get_json("/api/tenants")["tenants"]}
    assert shown.keys() == expected.keys()
    budget = shown["t-budget"]
    assert (budget["paused"], budget["weight"], budget["weight_overridden"]) == (True, 3, True)
    for name, figures in expected.items():
        for field in ("running", "waiting", "open", "paused", "weight"):
            assert shown[name][field] == figures[field], (name, field)

    page = flower.page("/tenants")
    cells = re.search(r'<tr data-tenant="t-budget">(.*?)</tr>', page, re.S)
    assert cells is not None, page
    assert [c.strip() for c in re.findall(r"<td>(.*?)</td>", cells.group(1), re.S)][-4:-2] == [
        "3*",
        "yes",
    ]
    assert 'aria-current="page">Tenants</a>' in page  # in the navigation bar
    with flower.client() as anonymous:
        assert anonymous.get("/api/tenants").status_code == 401
        assert anonymous.get("/tenants").status_code == 401
