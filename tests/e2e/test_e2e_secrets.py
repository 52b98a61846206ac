"""A planted secret shows nowhere it could leak: one value, passed as ``api_token`` (and as a
nested ``password``) to governed calls that run, wait for approval, are approved, denied and
shadowed, through real workers, govctl, Flower and a webhook.

It must not appear in the result backend (results with Celery's extended fields), in govctl's
output (text and ``--json``, except ``held show --reveal``, which is the point of it), in
Flower's API and pages, in the audit log or in a webhook's body. The call itself (the broker
message, the ledger, the held store) keeps it: that is what runs.
"""

from __future__ import annotations

import html
import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from governance.embedded import EmbeddedRedis
from governance.integration import ActionDenied, GovernanceHeaders, governance_context
from governance.integration.runtime import runtime_for
from governance.policy.context import ActionContext
from governance.policy.signing import load_private_key, public_key_text
from tests.e2e.conftest import WorkerProcess, wait_until
from tests.e2e.flower_process import FlowerProcess
from tests.e2e.observer import ObserverServer

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
SECRET = f"sk-planted-{uuid.uuid4().hex}"
TENANT = "sec"


def _db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


POLICY = """version: 1
tools:
  ops.lookup: network.read
  ops.deploy: process.exec
tenants:
  sec:
    allowed_tools: [ops.lookup, ops.deploy]
    tiers:
      actions: {process.exec: act_with_approval}
      agents: {watcher: shadow}
    deny:
      - {agent: "intern-*", reason: "interns may not act"}
    reviewers: {alice: "ALICE"}
    approval: {quorum: 1}
    notify: [{kind: webhook, url: "HOOK"}]
"""


class Secrets:
    """The deployment of the test: its settings, its app (imported here), its worker."""

    def __init__(self, env: dict[str, str], app_module: ModuleType, redis_url: str) -> None:
        self.env = env
        self.module = app_module
        self.app = app_module.app
        self.redis_url = redis_url

    def govctl(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "governance.cli.main", *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == code, (args, done.stdout, done.stderr)
        return done


@pytest.fixture(scope="module")
def deployment(
    reviewer_keys: dict[str, Path],
    observer: ObserverServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Secrets, FlowerProcess, WorkerProcess]]:
    tmp = tmp_path_factory.mktemp("secrets")
    alice = public_key_text(load_private_key(reviewer_keys["alice"].read_bytes()).public_key())
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.replace("ALICE", alice).replace("HOOK", f"{observer.base_url}/hook"))
    with EmbeddedRedis() as server:
        settings = {
            "CELERY_BROKER_URL": _db(server.url, 0),
            "CELERY_RESULT_BACKEND": _db(server.url, 1),
            "GOVERNANCE_BROKER_URL": _db(server.url, 0),
            "GOVERNANCE_STATE_REDIS_URL": _db(server.url, 2),
            "GOVERNANCE_CONFIG_PATH": str(policy),
            "GOVERNANCE_AUDIT_KEY": "secrets-audit-key",
            "GOVERNANCE_WORKSPACE_DIR": str(tmp / "workspace"),
            "GOVERNANCE_APP": "tests.e2e.secret_app:app",
            "GOVERNANCE_LEASE_MS": "2000",
            "GOVERNANCE_SWEEP_POLL_S": "0.2",
        }
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("GOVERNANCE_", "CELERY_", "FLOWER_")) and k != "REDIS_URL"
            },
            **settings,
            "PYTHONPATH": str(ROOT),
            "COLUMNS": "200",
        }
        with pytest.MonkeyPatch.context() as patch:
            for name in [k for k in os.environ if k.startswith(("GOVERNANCE_", "CELERY_"))]:
                patch.delenv(name)
            for name, value in settings.items():
                patch.setenv(name, value)
            sys.modules.pop("tests.e2e.secret_app", None)
            module = importlib.import_module("tests.e2e.secret_app")
            secrets = Secrets(env, module, server.url)
            flower = FlowerProcess(env, tmp / "flower.log", app_module="tests.e2e.secret_app")
            worker = WorkerProcess(
                env, tmp / "worker.log", concurrency=2, name="secrets",
                app_module="tests.e2e.secret_app", queues="secrets",
            )  # fmt: skip
            try:
                flower.start()
                worker.start(secrets.app)
                _wait_until_flower_sees(secrets, flower)
                yield secrets, flower, worker
            except BaseException:
                print(worker.log_tail(), flower.log_tail())
                raise
            finally:
                worker.stop()
                flower.stop()
                secrets.app.close()


def _ctx(agent: str, run: str = "run-secrets") -> dict[str, str]:
    return {"tenant": TENANT, "agent": agent, "run": run, "user": "carol"}


def _wait_until_flower_sees(secrets: Secrets, flower: FlowerProcess) -> None:
    def probe_seen() -> bool:
        with governance_context(**_ctx("prober", run="run-probe")):
            probe = secrets.module.lookup.delay("probe", api_token="not-a-secret")
        probe.get(timeout=30)
        try:
            wait_until(
                lambda: flower.tasks().get(probe.id, {}).get("state") == "SUCCESS",
                timeout_s=3, what="flower to see the probe", poll_s=0.1,
            )  # fmt: skip
        except AssertionError:
            return False
        return True

    wait_until(probe_seen, timeout_s=60, what="flower to capture events", poll_s=0)


def test_a_planted_secret_shows_nowhere(
    deployment: tuple[Secrets, FlowerProcess, WorkerProcess],
    reviewer_keys: dict[str, Path],
    observer: ObserverServer,
) -> None:
    secrets, flower, worker = deployment
    module = secrets.module
    options = {"password": SECRET, "region": "eu"}

    # Runs (allowed), shadowed, denied at publish, denied by the worker (sent straight to the
    # broker, as anyone who can reach it may), and held until approved with govctl.
    with governance_context(**_ctx("bot")):
        ran = module.lookup.delay("weather", api_token=SECRET)
    assert ran.get(timeout=30) == "weather: found"
    with governance_context(**_ctx("watcher")):
        shadowed = module.lookup.delay("weather", api_token=SECRET)
    assert shadowed.get(timeout=30)["would_run"]["input"]["api_token"] == "***"
    with (
        pytest.raises(ActionDenied, match="interns may not act"),
        governance_context(**_ctx("intern-1")),
    ):
        module.lookup.delay("weather", api_token=SECRET)
    raw_id = str(uuid.uuid4())
    headers = GovernanceHeaders(context=ActionContext(**_ctx("intern-2"))).to_headers()
    runtime_for(secrets.app).send_raw(
        "ops.lookup", (), {"query": "weather", "api_token": SECRET}, task_id=raw_id,
        headers=headers, queue="secrets",
    )  # fmt: skip
    with pytest.raises(ActionDenied):
        secrets.app.AsyncResult(raw_id).get(timeout=30)

    printed: list[str] = []

    def govctl(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = secrets.govctl(*args, code=code)
        printed.extend((done.stdout, done.stderr))
        return done

    submitted = govctl(
        "submit", "task", "ops.deploy", "-t", TENANT, "-a", "deployer", "--run", "run-secrets",
        "-u", "carol", "--arg", '"billing"', "-i", f"api_token={SECRET}",
        "-i", f"options:={json.dumps(options)}", "--json",
    )  # fmt: skip
    held_id = json.loads(submitted.stdout)["task_id"]
    assert json.loads(submitted.stdout)["state"] == "HELD"
    for args in (("held", "list"), ("held", "list", "--json"), ("held", "show", held_id),
                 ("held", "show", held_id, "--json")):  # fmt: skip
        govctl(*args)
    shown = json.loads(govctl("held", "show", held_id, "--json").stdout)
    assert shown["call"]["api_token"].startswith("*** (sha256:")
    assert shown["call"]["api_token"].endswith(f", {len(SECRET)} chars)")
    assert shown["call"]["options"]["password"].startswith("*** (sha256:")
    # --reveal shows it (audited, with who asked): the planted value is the real one.
    revealed = secrets.govctl("held", "show", held_id, "--reveal", "--json")
    assert json.loads(revealed.stdout)["call"]["api_token"] == SECRET
    approved = govctl("held", "approve", held_id, "--key", str(reviewer_keys["alice"]), "--json")
    assert json.loads(approved.stdout)["outcome"] == "released"
    deployed = secrets.app.AsyncResult(held_id)
    assert deployed.get(timeout=30) == "deployed billing"
    afterwards = (
        ("held", "list", "--status", "released", "--json"),
        ("held", "list", "--status", "released"),
        ("usage", "--tenant", TENANT),
        ("usage", "--tenant", TENANT, "--run", "run-secrets", "--json"),
        ("status",),
        ("audit", "tail", "-n", "100"),
        ("audit", "tail", "-n", "100", "--json"),
    )
    for args in afterwards:
        govctl(*args)
    assert not [text for text in printed if SECRET in text], "govctl printed the secret"

    # The webhook a reviewer got about the held call: masked as govctl masks it.
    wait_until(
        lambda: [h for h in observer.observations.hooks if h.get("task_id") == held_id],
        timeout_s=30, what="the webhook of the held call",
    )  # fmt: skip
    hooks = [h for h in observer.observations.hooks if h.get("task_id") == held_id]
    assert hooks[0]["call"]["input"]["api_token"].startswith("*** (sha256:")
    assert SECRET not in json.dumps(hooks)

    # The result backend (extended results: Celery stores each call's arguments too).
    results = redis.Redis.from_url(_db(secrets.redis_url, 1))
    stored = {key: results.get(key) for key in results.scan_iter("celery-task-meta-*")}
    assert {f"celery-task-meta-{i}".encode() for i in (ran.id, held_id, raw_id)} <= set(stored)
    meta = json.loads(stored[f"celery-task-meta-{ran.id}".encode()] or b"{}")
    assert (meta["args"], meta["kwargs"]) == (["weather"], {"api_token": "***"})
    assert not [k for k, v in stored.items() if v and SECRET.encode() in v]

    # The audit log: every entry of every chain.
    state = redis.Redis.from_url(_db(secrets.redis_url, 2))
    streams = [k for k in state.scan_iter("gov:*") if state.type(k) == b"stream"]
    entries = [fields for key in streams for _, fields in state.xrange(key)]
    assert any(f.get(b"type") == b"secret_revealed" for f in entries)
    assert not [f for f in entries if SECRET.encode() in b"".join(f.values())]

    # Flower: its API, its task list and each task's page.
    ends = {ran.id: "SUCCESS", held_id: "SUCCESS", raw_id: "DENIED", shadowed.id: "SHADOWED"}

    def flower_has_all() -> bool:
        listed = flower.tasks()
        return all(listed.get(i, {}).get("state") == state for i, state in ends.items())

    wait_until(flower_has_all, timeout_s=30, what="flower to show every task's end")
    seen = [json.dumps(flower.tasks()), json.dumps(flower.datatable())]
    for task_id in (ran.id, held_id, raw_id, shadowed.id):
        seen.append(json.dumps(flower.task_info(task_id)))
        seen.append(flower.task_page(task_id))
    assert "'api_token': '***'" in html.unescape(flower.task_page(ran.id))
    assert not [text for text in seen if SECRET in text], "flower shows the secret"
    # Nor do the worker's own log lines (Celery logs each received call).
    assert SECRET not in worker.log_path.read_text(errors="replace")
