"""An agent attacks the file tools through the workspace, against a real root worker.

The worker runs as root (as in most containers): `shell` commands run as `nobody`, and the file
tools act with `nobody`'s file-system identity, through descriptors. Outside the workspace lie a
0600 secret and a victim file, in a directory only root may write. The agent plants symlinks, a
FIFO and a hard link, and swaps a folder of the workspace with a symlink to that directory in a
loop (`renameat2(RENAME_EXCHANGE)`), from its own `shell` command and from another thread, while
its `read_file`, `write_file` and `delete_file` calls run. Each attack fails, the task's failure
and its audit entry say why, and nothing else breaks: the tools still work, the audit verifies.

The deployment is this module's own (a tenant that may use all three tools and run `shell`
without approval, and a workspace of its own). It needs root, and skips elsewhere (CI is root).
The deterministic race (the swap at the tools' hook) is in `tests/workers/test_tools_files.py`:
a hook cannot be set inside a real worker.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from governance.embedded import EmbeddedRedis
from governance.integration import ActionFailed
from governance.policy.context import ActionContext
from governance.settings import GovernanceSettings
from governance.store.keys import PoolKeys
from tests.e2e.conftest import (
    Deployment,
    WorkerProcess,
    audit_of,
    fresh_broker_url,
    types_of,
    verify_audit,
    wait_until,
)
from workers.api import submit_tool

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root (CI runs as root): the worker must be root for its shell commands and "
        "file tools to run as another user, and for targets only root may touch",
    ),
]

CTX = ActionContext(tenant="t-files", agent="attacker", run="run-attack")
SECRET = "TOP-SECRET root-only content"
DECOY = "decoy inside the workspace"
TENANT = """
  t-files:
    allowed_tools: [read_file, write_file, delete_file, shell]
    tiers:
      actions: {process.exec: act_auto}
"""
RACE_S = 5.0
"""How long each race runs (two of them: about 10 s in all)."""

SWAPPER = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
race = os.open("race", os.O_RDONLY | os.O_DIRECTORY)
open("swapping", "w").close()
end = time.monotonic() + {seconds}
swaps = 0
while time.monotonic() < end and not os.path.exists("stop"):
    if libc.renameat2(race, b"sub", race, b"link", 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    swaps += 1
    if swaps % 25 == 0:  # after an odd count, then an even one: each side has its turn
        time.sleep(0.001)  # under the CPU limit, on a machine the worker shares
if swaps % 2:
    libc.renameat2(race, b"sub", race, b"link", 2)  # the folder back under its name
open("swapped", "w").close()
print(swaps)
"""


@dataclass
class Target:
    """What lies outside the workspace: a root-only secret and victim in a root-owned folder."""

    outside: Path

    @property
    def secret(self) -> Path:
        return self.outside / "secret.txt"

    @property
    def victim(self) -> Path:
        return self.outside / "victim.txt"

    def assert_untouched(self) -> None:
        assert sorted(p.name for p in self.outside.iterdir()) == ["secret.txt", "victim.txt"]
        assert self.secret.read_text() == SECRET
        assert self.victim.read_text() == "victim"


@pytest.fixture(scope="module")
def files(
    e2e_env: dict[str, str],
    e2e_policy: Path,
    broker_kind: str,
    broker: EmbeddedRedis,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """A deployment of this module's own: the test policy plus `t-files`, its own workspace."""
    from workers.app import create_app

    tmp = tmp_path_factory.mktemp("attack-files")
    policy = tmp / "policy.yaml"
    policy.write_text(e2e_policy.read_text().rstrip("\n") + "\n" + TENANT)
    workspace = tmp / "workspace"
    workspace.mkdir()
    with (
        fresh_broker_url(broker_kind, request, "files") as broker_url,
        EmbeddedRedis(appendonly=True) as state,
    ):
        settings_env = {
            **e2e_env,
            "GOVERNANCE_BROKER_URL": broker_url,
            "GOVERNANCE_STATE_REDIS_URL": state.url,
            # Results outside the state Redis, as `make_deployment` keeps them.
            "GOVERNANCE_RESULT_BACKEND": f"{broker.url.rsplit('/', 1)[0]}/5",
            "GOVERNANCE_CONFIG_PATH": str(policy),
            "GOVERNANCE_WORKSPACE_DIR": str(workspace),
        }
        env = {**os.environ, **settings_env}
        env.pop("REDIS_URL", None)
        app = create_app(
            GovernanceSettings(
                **{k.removeprefix("GOVERNANCE_").lower(): v for k, v in settings_env.items()}
            )
        )
        deployment = Deployment(broker_url, state, env, app, tmp, [])
        worker = WorkerProcess(env, tmp / "worker.log", concurrency=4, name="files")
        worker.start(app)
        deployment.workers.append(worker)
        settle_the_pool(deployment)
        try:
            yield deployment
        finally:
            worker.kill()
            app.close()


def settle_the_pool(files: Deployment) -> None:
    """A fresh worker's first message can wait in the broker past the pool's backlog mark
    (250 ms) on a loaded machine, and the pool then counts as saturated for a while: the next
    calls would wait for the pool from publication (a `waiting` entry before `admitted`), which
    is not what these tests are about. One call first, past its backlog hold, and a second that
    finds the pool as it is then (a stale mark is cleared by the pool call it makes)."""
    outcome(files, "read_file", path="warm-up.txt")
    client = redis.Redis.from_url(files.state.url)
    try:

        def backlog_over() -> bool:
            seconds, micros = client.time()
            held = client.hget(PoolKeys("celery").state, "backlog_until")
            return int(held or 0) <= int(seconds) * 1000 + int(micros) // 1000

        wait_until(backlog_over, 10, "the pool's backlog hold to pass")
        outcome(files, "read_file", path="warm-up.txt")
    finally:
        client.close()


def workspace_of(files: Deployment) -> Path:
    return Path(files.env["GOVERNANCE_WORKSPACE_DIR"])


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def target() -> Iterator[Target]:
    # Outside the pytest tree (private to root), so only the targets' own modes protect them.
    made = Target(Path(tempfile.mkdtemp(prefix="outside-")))
    try:
        made.outside.chmod(0o755)
        made.secret.write_text(SECRET)
        made.secret.chmod(0o600)
        made.victim.write_text("victim")
        yield made
    finally:
        shutil.rmtree(made.outside)


@pytest.fixture
def race(files: Deployment, target: Target) -> Iterator[Path]:
    """`race/sub` (a folder with decoys) and `race/link` (a symlink to the target's folder),
    made by the workspace's user as its commands would; removed after the test."""
    root = workspace_of(files) / "race"
    shutil.rmtree(root, ignore_errors=True)
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "secret.txt").write_text(DECOY)
    (root / "sub" / "victim.txt").write_text(DECOY)
    (root / "link").symlink_to(target.outside, target_is_directory=True)
    for path in (root, root / "sub", root / "sub" / "secret.txt", root / "sub" / "victim.txt"):
        os.chown(path, *nobody())
    os.chown(root / "link", *nobody(), follow_symlinks=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def outcome(files: Deployment, tool: str, **tool_input: Any) -> tuple[str, Any]:
    """Run one tool call for the attacker: ("ok", result) or ("failed", the failure's text)."""
    result = submit_tool(files.app, CTX, tool, **tool_input)
    try:
        return "ok", result.get(timeout=30)
    except ActionFailed as exc:
        return "failed", (result.id, str(exc))


def assert_refused(files: Deployment, got: tuple[str, Any], reason: str) -> None:
    """A permanent failure whose text and `task_failed` audit entry both give `reason`."""
    state, (task_id, text) = got
    assert state == "failed"
    assert reason in text
    runtime = files.runtime
    wait_until(lambda: "task_failed" in types_of(audit_of(runtime, task_id)), 10, "task_failed")
    entries = audit_of(runtime, task_id)
    assert types_of(entries) == ["admitted", "task_failed"]
    assert entries[-1].fields["reason"] == f"permanent error after 1 attempt(s): {reason}"


def test_planted_symlinks_fifos_and_hard_links_are_refused_and_said_so(
    files: Deployment, target: Target, race: Path
) -> None:
    for tool, tool_input in [
        ("read_file", {"path": "race/link/secret.txt"}),
        ("write_file", {"path": "race/link/new.txt", "content": "pwned"}),
        ("delete_file", {"path": "race/link/victim.txt"}),
    ]:
        reason = f"path '{tool_input['path']}' goes through a symbolic link (race/link): refused"
        assert_refused(files, outcome(files, tool, **tool_input), reason)
    target.assert_untouched()

    workspace = workspace_of(files)
    os.mkfifo(race / "pipe")
    os.chown(race / "pipe", *nobody())
    started = time.monotonic()
    assert_refused(
        files,
        outcome(files, "read_file", path="race/pipe"),
        "not a regular file: race/pipe (a FIFO): refused",
    )
    assert time.monotonic() - started < 20  # answered, not blocked on the FIFO

    # Readable by anyone (0644), so only the hard-link rule stands in the way.
    shared = target.outside / "shared.txt"
    shared.write_text("root's")
    try:
        os.link(shared, race / "hard.txt")
        assert_refused(
            files,
            outcome(files, "read_file", path="race/hard.txt"),
            "race/hard.txt has 2 hard links and nobody does not own it: refused",
        )
    finally:
        shared.unlink()

    # Nothing else broke: the tools work, as the workspace's user, and the audit verifies.
    assert outcome(files, "write_file", path="race/ok/a.txt", content="fine")[0] == "ok"
    assert outcome(files, "read_file", path="race/ok/a.txt")[1]["content"] == "fine"
    written = race / "ok" / "a.txt"
    assert (written.stat().st_uid, written.stat().st_gid) == nobody()
    assert outcome(files, "delete_file", path="race/ok/a.txt")[1] == {
        "path": "race/ok/a.txt",
        "deleted": True,
    }
    assert workspace.stat().st_uid == nobody()[0]
    assert verify_audit(files.runtime) == []


EXPECTED = {
    f"read_file: {DECOY}",
    "read_file: refused, a symbolic link",
    "read_file: refused, changed while walked",
    "write_file: ok",
    "write_file: refused, a symbolic link",
    "write_file: refused, changed while walked",
    "delete_file: ok",
    "delete_file: refused, a symbolic link",
    "delete_file: refused, changed while walked",
}
"""Every outcome a call may have in the race: the tool acted on the folder it walked (inside),
or refused with the reason."""


def _attack_while(
    files: Deployment, target: Target, swapping: Callable[[], bool], bound_s: float
) -> Counter[str]:
    """Call the three tools on `race/sub/...` while `swapping()` (at most `bound_s`); count the
    outcomes. Every call must stay inside: a read never returns the secret, and nothing is
    written or deleted outside."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + bound_s
    calls = [
        ("read_file", {"path": "race/sub/secret.txt"}),
        ("write_file", {"path": "race/sub/new.txt", "content": "pwned"}),
        ("delete_file", {"path": "race/sub/victim.txt"}),
    ]
    while swapping() and time.monotonic() < deadline:
        pending = [(tool, submit_tool(files.app, CTX, tool, **inp)) for tool, inp in calls]
        for tool, result in pending:
            try:
                value = result.get(timeout=30)
            except ActionFailed as exc:
                text = str(exc)
                if "goes through a symbolic link (race/sub)" in text:
                    seen[f"{tool}: refused, a symbolic link"] += 1
                elif "race/sub changed while it was walked" in text:
                    seen[f"{tool}: refused, changed while walked"] += 1
                else:
                    seen[f"{tool}: {text}"] += 1
                continue
            if tool == "read_file":
                assert value["content"] != SECRET, "read the secret outside the workspace"
                seen[f"read_file: {value['content']}"] += 1
            else:
                seen[f"{tool}: ok"] += 1
        target.assert_untouched()
    return seen


def _assert_race_lost(files: Deployment, target: Target, seen: Counter[str]) -> None:
    print(f"\noutcomes: {dict(seen)}")
    target.assert_untouched()
    assert set(seen) <= EXPECTED, seen
    assert seen[f"read_file: {DECOY}"] + seen["write_file: ok"] > 0
    assert any(": refused" in key for key in seen), seen
    assert verify_audit(files.runtime) == []


def test_a_folder_swapped_with_a_symlink_by_another_process_never_lets_a_tool_out(
    files: Deployment, target: Target, race: Path
) -> None:
    """The swap in a loop from this (root) process while the worker's tools run: bounded."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("renameat2 is not available in this C library")
    race_fd = os.open(race, os.O_RDONLY | os.O_DIRECTORY)
    swapping = threading.Event()
    swapping.set()
    swaps = [0]
    failures: list[BaseException] = []

    def swapper() -> None:
        try:
            end = time.monotonic() + RACE_S
            while time.monotonic() < end:
                if libc.renameat2(race_fd, b"sub", race_fd, b"link", 2) != 0:
                    raise OSError(ctypes.get_errno(), "renameat2")
                swaps[0] += 1
                if swaps[0] % 25 == 0:  # after an odd count, then an even one
                    time.sleep(0.001)
            if swaps[0] % 2:
                libc.renameat2(race_fd, b"sub", race_fd, b"link", 2)
        except BaseException as exc:
            failures.append(exc)
        finally:
            swapping.clear()

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        seen = _attack_while(files, target, swapping.is_set, RACE_S + 10)
    finally:
        swapping.clear()
        thread.join(10)
        os.close(race_fd)
    assert not failures, failures
    assert swaps[0] > 100
    _assert_race_lost(files, target, seen)


def _system_python() -> str | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def test_an_agents_shell_command_swapping_a_folder_never_lets_a_tool_out(
    files: Deployment, target: Target, race: Path
) -> None:
    """The reported attack itself: the agent's own `shell` command (as `nobody`) swaps while
    its file tool calls run, for a bounded time."""
    python = _system_python()
    if python is None:
        pytest.skip("no system Python for the agent's command to run (as nobody)")
    workspace = workspace_of(files)
    for name in ("swapping", "swapped", "stop"):
        (workspace / name).unlink(missing_ok=True)
    command = submit_tool(
        files.app, CTX, "shell", command=[python, "-c", SWAPPER.format(seconds=RACE_S)]
    )
    wait_until(
        lambda: (workspace / "swapping").exists() or command.ready(),
        timeout_s=30,
        what="the agent's command to start swapping",
    )
    try:
        seen = _attack_while(
            files,
            target,
            lambda: not (workspace / "swapped").exists() and not command.ready(),
            RACE_S + 10,
        )
    finally:
        (workspace / "stop").touch()
    result = command.get(timeout=30)
    assert result["returncode"] == 0, result
    assert result["isolation"]["user"].startswith("nobody")
    assert int(result["stdout"]) > 100
    assert stat.S_ISDIR((race / "sub").lstat().st_mode)  # swapped back at the end
    _assert_race_lost(files, target, seen)
