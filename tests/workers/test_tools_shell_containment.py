"""`shell` is contained: no secrets of the worker, no network, limits that stop a command,
and nothing of a call outlives it or starves another call.

These run real commands, as root (CI) and as an ordinary user. As root the command runs as the
unprivileged `shell_user` (nobody); otherwise as our own user, where the worker's secrets are
protected by making the worker non-dumpable. What cannot apply in one of the two cases is
skipped with the reason.

The last part attacks the containment of the call (`workers.tools.containment`): a `setsid`
grandchild, a fork bomb next to another call, survivors across calls, a worker killed during a
call; under each mechanism this machine has (what `containment.detect` found, a uid of the
call's own, each with and without a PID namespace), and with none (fail closed, best effort).
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from tests.polling import wait_until
from workers.tools import TOOLS, ToolEnv, containment, validate_input
from workers.tools.sandbox import ShellLimits

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
SECRET = "sk-worker-secret-0123456789"


#: Whether the tests run `shell` in best effort (set by the fixture below, and by some tests).
BEST_EFFORT = False


@pytest.fixture(autouse=True)
def best_effort_without_containment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the worker can contain no call (not root, no writable cgroup) `shell` refuses to
    run; the tests then run it in best effort, and those about containment skip."""
    available = containment.detect()
    if available.cgroup is None and available.uids is None:
        monkeypatch.setattr(sys.modules[__name__], "BEST_EFFORT", True)


def shell(
    command: list[str],
    workspace: Path,
    limits: ShellLimits | None = None,
    timeout_s: float = 30.0,
    shell_user: str | None = "nobody",
    isolate_network: bool = True,
) -> dict[str, Any]:
    env = ToolEnv(
        workspace=workspace,
        shell_timeout_s=timeout_s,
        shell_user=shell_user,
        shell_limits=limits or ShellLimits(),
        shell_isolate_network=isolate_network,
        shell_best_effort=BEST_EFFORT,
    )
    spec = TOOLS["shell"]
    return spec.run(validate_input(spec, {"command": command}, env), env)


@pytest.fixture
def python3(workspace: Path) -> str:
    """`python3` as the command's user finds it on PATH (skips when it cannot run one)."""
    try:
        shell(["python3", "-c", "pass"], workspace)
    except ActionError as exc:
        pytest.skip(f"the command's user cannot run python3: {exc}")
    return "python3"


def _system_python() -> str | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def secret_holder() -> Iterator[Any]:
    """Start a stand-in for a worker process: a secret in its environment, hardened or not.

    It runs as the user the commands run as (nobody as root, else ourselves), which is the case
    where only non-dumpability protects it; as root it needs a Python and this checkout that
    nobody can read, else the test is skipped.
    """
    started: list[subprocess.Popen[str]] = []

    def start(harden: bool) -> int:
        python = _system_python()
        if python is None:
            pytest.skip("no Python interpreter to run the stand-in worker with")
        user = group = None
        if AS_ROOT:
            nobody = pwd.getpwnam("nobody")
            user, group = nobody.pw_uid, nobody.pw_gid
        code = (
            "import sys\n"
            "from workers.hardening import make_process_non_dumpable\n"
            f"if {harden}:\n"
            "    assert make_process_non_dumpable(), 'make_process_non_dumpable failed'\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen(
            [python, "-c", code],
            cwd=ROOT,
            env={"PATH": os.defpath, "PYTHONPATH": str(ROOT), "GOVERNANCE_AUDIT_KEY": SECRET},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            user=user,
            group=group,
            extra_groups=[] if AS_ROOT else None,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            _out, err = proc.communicate()
            assert "AssertionError" not in err, err
            pytest.skip(f"the stand-in worker could not start as uid {user}: {err[-300:]}")
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.communicate()


def test_the_command_runs_as_the_shell_user_when_the_worker_is_root(workspace: Path) -> None:
    if not AS_ROOT:
        pytest.skip("the worker is not root: commands run as its own user")
    result = shell(["id", "-u"], workspace)
    assert result["stdout"].strip() == str(pwd.getpwnam("nobody").pw_uid)
    assert result["isolation"]["user"].startswith("nobody (uid ")
    # The workspace is usable by it.
    assert shell(["touch", "made-by-shell"], workspace)["returncode"] == 0
    assert (workspace / "made-by-shell").stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_a_root_worker_refuses_a_missing_or_root_shell_user(workspace: Path) -> None:
    if not AS_ROOT:
        pytest.skip("only a root worker switches users")
    with pytest.raises(ActionError, match="shell_user 'no-such-user-xyz' does not exist") as info:
        shell(["true"], workspace, shell_user="no-such-user-xyz")
    assert info.value.kind is ErrorKind.permanent
    with pytest.raises(ActionError, match="shell_user 'root' is root"):
        shell(["true"], workspace, shell_user="root")
    with pytest.raises(ActionError, match="no shell_user is configured"):
        shell(["true"], workspace, shell_user=None)


NETWORK_CASES = pytest.mark.parametrize(
    "isolate_network", [True, False], ids=["own-network-namespace", "worker-network"]
)
"""Without its own network namespace a command also has no user namespace of its own (as in a
container whose seccomp profile refuses them): then only non-dumpability protects the worker."""


@NETWORK_CASES
def test_the_command_cannot_read_a_hardened_worker_environment(
    workspace: Path, secret_holder: Any, isolate_network: bool
) -> None:
    pid = secret_holder(harden=True)
    result = shell(["cat", f"/proc/{pid}/environ"], workspace, isolate_network=isolate_network)
    assert SECRET not in result["stdout"]
    assert result["returncode"] != 0
    assert "Permission denied" in result["stderr"]
    # Its memory neither.
    result = shell(
        ["head", "-c", "1", f"/proc/{pid}/mem"], workspace, isolate_network=isolate_network
    )
    assert result["returncode"] != 0
    # The same command does read an environment it may read: its own.
    own = shell(["cat", "/proc/self/environ"], workspace)["stdout"]
    assert f"HOME={workspace}" in own.split("\0")


@NETWORK_CASES
def test_without_hardening_the_same_user_could_read_it(
    workspace: Path, secret_holder: Any, isolate_network: bool
) -> None:
    """The control: why workers make themselves non-dumpable."""
    pid = secret_holder(harden=False)
    result = shell(["cat", f"/proc/{pid}/environ"], workspace, isolate_network=isolate_network)
    isolation = result["isolation"]
    pid_namespace = isolation["containment"].startswith(("pid namespace", "best effort: pid"))
    if not AS_ROOT and (isolation["network"] == "none" or pid_namespace):
        # The command runs in a user namespace of its own (made for the network and PID
        # namespaces); the kernel refuses it the /proc files of processes outside, hardened or
        # not.
        assert SECRET not in result["stdout"]
        pytest.skip("the command's own user namespace protects even a dumpable process")
    assert f"GOVERNANCE_AUDIT_KEY={SECRET}" in result["stdout"].split("\0")


def test_make_process_non_dumpable() -> None:
    code = (
        "from workers.hardening import is_dumpable, make_process_non_dumpable\n"
        "assert is_dumpable()\n"
        "assert make_process_non_dumpable()\n"
        "assert not is_dumpable()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_worker_app_hardens_its_processes() -> None:
    """workers.app connects Celery's worker_init and worker_process_init to the hardening."""
    code = (
        "from celery.signals import worker_init, worker_process_init\n"
        "import workers.app\n"
        "from workers.hardening import is_dumpable\n"
        "assert is_dumpable()\n"
        "worker_process_init.send(sender=None)\n"
        "assert not is_dumpable()\n"
        "hooks = [receiver for _key, receiver in worker_init.receivers]\n"
        "assert workers.app.harden_worker_process in hooks\n"
        "print('ok')\n"
    )
    env = {**os.environ, "GOVERNANCE_CONFIG_PATH": str(ROOT / "config" / "governance.yaml")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_the_command_has_no_network(workspace: Path, python3: str) -> None:
    """A listener on loopback (think: the state Redis) is out of reach of the command."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        shared = shell([python3, "-c", code], workspace, isolate_network=False)
        result = shell([python3, "-c", code], workspace)
    assert shared["returncode"] == 0, "the control: with the worker's network it connects"
    assert shared["isolation"]["network"] == "shared: isolation turned off (shell_isolate_network)"
    if result["isolation"]["network"] != "none":
        pytest.skip(f"the kernel refused a network namespace: {result['isolation']['network']}")
    assert result["returncode"] != 0
    assert "Network is unreachable" in result["stderr"]


# --- limits ---------------------------------------------------------------------------------


def test_an_output_flood_is_stopped(workspace: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ActionError, match="yes was stopped by the output limit") as info:
        shell(["yes"], workspace)
    assert info.value.kind is ErrorKind.permanent
    assert "more than 1048576 bytes on stdout" in info.value.message
    assert time.monotonic() - started < 10


def test_a_fork_loop_is_stopped_by_the_process_limit(workspace: Path, python3: str) -> None:
    code = (
        "import os, time\n"
        "for _ in range(1000):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
    )
    started = time.monotonic()
    with pytest.raises(ActionError, match="python3 was stopped by the process limit") as info:
        shell([python3, "-c", code], workspace, ShellLimits(processes=8))
    assert info.value.kind is ErrorKind.permanent
    cap = "8 more processes than its user already runs" if BEST_EFFORT else ""
    assert f"the process limit ({cap or '8 processes for this call'})" in info.value.message
    assert "Resource temporarily unavailable" in info.value.message
    assert time.monotonic() - started < 20, "the forked children were killed with the group"


def test_a_shell_fork_loop_is_stopped_too(workspace: Path) -> None:
    """dash gives up at once ("Cannot fork"); bash retries for about 15 s before it does."""
    script = "i=0; while [ $i -lt 1000 ]; do sleep 60 & i=$((i+1)); done; wait"
    with pytest.raises(ActionError, match="stopped by the process limit"):
        shell(["sh", "-c", script], workspace, ShellLimits(processes=8), timeout_s=45)


def test_a_cpu_burner_is_stopped_by_the_cpu_limit(workspace: Path) -> None:
    with pytest.raises(ActionError, match=r"sh was stopped by the CPU time limit \(1 s") as info:
        shell(["sh", "-c", "while :; do :; done"], workspace, ShellLimits(cpu_s=1))
    assert info.value.kind is ErrorKind.permanent


def test_a_memory_hog_is_stopped_by_the_memory_limit(workspace: Path, python3: str) -> None:
    limits = ShellLimits(memory_bytes=256 * 1024 * 1024)
    with pytest.raises(ActionError, match="stopped by the memory limit") as info:
        shell([python3, "-c", "b = bytearray(1024 * 1024 * 1024)"], workspace, limits)
    assert "MemoryError" in info.value.message


def test_a_big_file_is_stopped_by_the_file_size_limit(workspace: Path) -> None:
    limits = ShellLimits(file_size_bytes=1024 * 1024)
    command = ["dd", "if=/dev/zero", "of=big", "bs=1M", "count=4"]
    with pytest.raises(ActionError, match=r"dd was stopped by the file size limit \(1048576"):
        shell(command, workspace, limits)
    assert (workspace / "big").stat().st_size <= 1024 * 1024


def test_too_many_open_files_are_stopped(workspace: Path, python3: str) -> None:
    code = "files = [open('/dev/null') for _ in range(100)]"
    with pytest.raises(ActionError, match="stopped by the open files limit"):
        shell([python3, "-c", code], workspace, ShellLimits(open_files=16))


def test_a_command_within_its_limits_is_a_result(workspace: Path) -> None:
    result = shell(["sh", "-c", "echo fine; exit 3"], workspace, ShellLimits(cpu_s=2))
    assert result["returncode"] == 3
    assert result["stdout"] == "fine\n"


# --- nothing outlives the call, and one call cannot starve another ---------------------------

ESCAPE = (
    "import os, sys, time\n"
    "r, w = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.close(r)\n"
    "        null = os.open(os.devnull, os.O_WRONLY)\n"
    "        os.dup2(null, 1)\n"
    "        os.dup2(null, 2)\n"
    "        # Its pid as the worker's /proc numbers it (the call's PID namespace has its own).\n"
    "        open('escaped.pid', 'w').write(os.readlink('/proc/self'))\n"
    "        os.write(w, b'x')\n"
    "        time.sleep(120)\n"
    "    os._exit(0)\n"
    "os.close(w)\n"
    "os.read(r, 1)\n"
    "print(open('escaped.pid').read(), flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)
"""A double fork with `setsid` between: a grandchild in a session of its own, orphaned, its
output away from the call's pipes, that sleeps for two minutes; the command then sleeps argv[1]
seconds."""


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: only its parent's wait is missing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@dataclass(frozen=True)
class Mode:
    name: str
    available: containment.Available
    expect: str
    """The start of the result's `isolation.containment`."""


MODES = ["detected", "detected, no pid namespace", "own uid", "own uid, no pid namespace"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Mode:
    """One containment mechanism, forced: what `detect` found, or a uid of the call's own (as
    root), each with or without a PID namespace."""
    name: str = request.param
    found = containment.detect()
    if name.startswith("own uid"):
        if not AS_ROOT:
            pytest.skip("a uid of the call's own needs a root worker (CI runs this as root)")
        available = containment.Available(None, containment.UidPool(containment._lock_dir()))
    elif found.cgroup is None and found.uids is None:
        pytest.skip(f"no containment here ({'; '.join(found.why_not)}); CI runs this as root")
    else:
        available = containment.Available(found.cgroup, found.uids)
    if name.endswith("no pid namespace"):
        available = replace(available, pid_namespace=False)
    monkeypatch.setattr(containment, "detect", lambda: available)
    held = available.cgroup.kind if available.cgroup is not None else "uid "
    expect = held if not available.pid_namespace else f"pid namespace + {held}"
    return Mode(name, available, expect)


@pytest.mark.parametrize("ends", ["exits", "times out"])
def test_a_setsid_grandchild_ends_with_the_call(
    workspace: Path, python3: str, mode: Mode, ends: str
) -> None:
    if ends == "exits":
        result = shell([python3, "-c", ESCAPE, "0"], workspace)
        assert result["returncode"] == 0, result["stderr"]
        escaped = int(result["stdout"])
        held = result["isolation"]["containment"]
        assert held.startswith(mode.expect), held
    else:
        with pytest.raises(ActionError, match="timed out after 1 s") as info:
            shell([python3, "-c", ESCAPE, "60"], workspace, timeout_s=1.0)
        assert info.value.kind is ErrorKind.transient
        escaped = int((workspace / "escaped.pid").read_text())
    # Gone by the time the call returned: no waiting for it.
    assert not _alive(escaped), f"the setsid grandchild {escaped} outlived the call ({mode.name})"


def test_without_containment_the_setsid_grandchild_would_survive(
    workspace: Path, python3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: best effort without a PID namespace only kills the process group, which the
    grandchild left; this is the attack the containment stops."""
    available = containment.Available(None, None, pid_namespace=False, why_not=("forced",))
    monkeypatch.setattr(containment, "detect", lambda: available)
    monkeypatch.setattr(sys.modules[__name__], "BEST_EFFORT", True)
    result = shell([python3, "-c", ESCAPE, "0"], workspace)
    escaped = int(result["stdout"])
    try:
        assert result["isolation"]["containment"].startswith("best effort: process group only")
        assert _alive(escaped)
    finally:
        os.kill(escaped, signal.SIGKILL)


HOG = (
    "import os, time\n"
    "children = 0\n"
    "while True:\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    children += 1\n"
    "open('hog.full', 'w').close()\n"
    "deadline = time.monotonic() + 20\n"
    "while not os.path.exists('other.done') and time.monotonic() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print(children)\n"
)
"""Forks until the process cap stops it, holds all of it until the other call is done."""

OTHER = (
    "import os, time\n"
    "deadline = time.monotonic() + 20\n"
    "while not os.path.exists('hog.full') and time.monotonic() < deadline:\n"
    "    time.sleep(0.01)\n"
    "started = 0\n"
    "for _ in range(6):\n"
    "    try:\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60)\n"
    "            os._exit(0)\n"
    "        started += 1\n"
    "    except OSError as exc:\n"
    "        print(exc)\n"
    "open('other.done', 'w').close()\n"
    "print(started)\n"
)
"""Started first; once the hog is full, starts 6 processes at once."""


def test_a_fork_bomb_stops_at_its_own_cap_and_does_not_starve_another_call(
    workspace: Path, python3: str, mode: Mode
) -> None:
    limits = ShellLimits(processes=8)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(shell, [python3, "-c", OTHER], workspace, limits)
        hog = pool.submit(shell, [python3, "-c", HOG], workspace, limits)
        hog_result, other_result = hog.result(timeout=60), other.result(timeout=60)
    # The cap is absolute: the hog itself and 7 children, whatever else runs as its user.
    assert hog_result["stdout"].strip() == "7", hog_result
    # The other call, started before the hog filled its cap, still starts all of its own.
    assert other_result["stdout"].strip() == "6", other_result
    assert (workspace / "other.done").exists()


BOMB = (
    "import os, time\n"
    "r, w = os.pipe()\n"
    "while True:\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        os.setsid()\n"
    "        os.write(w, os.readlink('/proc/self').encode() + b' ')\n"
    "        time.sleep(120)\n"
    "        os._exit(0)\n"
    "os.close(w)\n"
    "time.sleep(0.2)\n"
    "os.set_blocking(r, False)\n"
    "print(os.read(r, 4096).decode())\n"
)
"""Forks `setsid` children until the cap stops it, prints their pids, and exits: they would all
survive a process-group kill."""


def test_survivors_never_accumulate_across_calls(workspace: Path, python3: str, mode: Mode) -> None:
    limits = ShellLimits(processes=6)
    for call in range(3):
        result = shell([python3, "-c", BOMB], workspace, limits)
        pids = [int(pid) for pid in result["stdout"].split()]
        # The whole cap each time: nothing of the calls before holds part of it.
        assert len(pids) == 5, (call, result)
        assert not [pid for pid in pids if _alive(pid)], f"call {call} left processes behind"
    available = containment.detect()
    if available.cgroup is not None:
        mine = f"-{os.getpid()}-"
        left = [p.name for p in available.cgroup.base.iterdir() if mine in p.name]
        assert not left, f"cgroups left behind: {left}"


def test_a_uid_of_its_own_hands_the_workspace_back_to_the_shell_user(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not AS_ROOT:
        pytest.skip("a uid of the call's own needs a root worker (CI runs this as root)")
    available = containment.Available(None, containment.UidPool(containment._lock_dir()))
    monkeypatch.setattr(containment, "detect", lambda: available)
    result = shell(["sh", "-c", "id -u; mkdir made && touch made/file"], workspace)
    uid = int(result["stdout"])
    assert containment.UID_BASE <= uid < containment.UID_BASE + containment.UID_COUNT
    assert result["isolation"]["user"].startswith(f"uid {uid} (the call's own")
    assert result["isolation"]["containment"].startswith(f"pid namespace + uid {uid} of its own")
    nobody = pwd.getpwnam("nobody")
    for path in (workspace / "made", workspace / "made" / "file"):
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)


def test_the_command_dies_with_its_worker(workspace: Path, python3: str) -> None:
    """A worker killed during a call (SIGKILL: no finally runs) takes the command with it."""
    found = containment.detect()
    if found.cgroup is None and found.uids is None:
        pytest.skip(f"no containment here ({'; '.join(found.why_not)}); CI runs this as root")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.workers.test_tools_shell_containment import ESCAPE, shell\n"
        "shell([sys.argv[1], '-c', ESCAPE, '60'], Path(sys.argv[2]))\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code, python3, str(workspace)], cwd=ROOT)
    try:
        pid_file = workspace / "escaped.pid"
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the grandchild")
        escaped = int(pid_file.read_text())
        assert _alive(escaped)
    finally:
        worker.kill()
        worker.wait()
    # The launcher dies with the worker, the namespace's init with the launcher, and the rest
    # of the namespace with its init (asynchronously: no one waits for them now).
    wait_until(lambda: not _alive(escaped), 5, f"the grandchild {escaped} to die with the worker")


# --- no containment: fail closed, or best effort when the operator says so --------------------


NONE_AVAILABLE = containment.Available(
    None,
    None,
    why_not=("cgroup v2: forced off", "cgroup v1: forced off", "per-call uid: forced off"),
)


def test_without_any_containment_shell_refuses_to_run(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(containment, "detect", lambda: NONE_AVAILABLE)
    monkeypatch.setattr(sys.modules[__name__], "BEST_EFFORT", False)
    with pytest.raises(ActionError, match="shell refuses to run: no way to end") as info:
        shell(["touch", "ran"], workspace)
    assert info.value.kind is ErrorKind.permanent
    assert "cgroup v1: forced off" in info.value.message
    assert "GOVERNANCE_SHELL_BEST_EFFORT=true" in info.value.message
    assert not (workspace / "ran").exists(), "nothing ran"


def test_best_effort_runs_and_says_so(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(containment, "detect", lambda: NONE_AVAILABLE)
    monkeypatch.setattr(sys.modules[__name__], "BEST_EFFORT", True)
    with caplog.at_level(logging.WARNING, logger="workers.tools.sandbox"):
        result = shell(["touch", "ran"], workspace)
    assert result["returncode"] == 0
    held = result["isolation"]["containment"]
    assert held.startswith("best effort: "), held
    assert "process cap relative (64 more processes than its user already runs)" in held
    assert "runs without containment of its own" in caplog.text


def test_stale_cgroups_of_a_dead_worker_are_swept(workspace: Path) -> None:
    found = containment.detect()
    if found.cgroup is None:
        pytest.skip(f"no cgroup here ({'; '.join(found.why_not)}); CI runs this as root")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now: the "worker" that left the cgroup
    tree = found.cgroup
    name = f"{containment.PREFIX}{containment._ns_tag()}-{dead.pid}-0-test"
    survivor = subprocess.Popen(["sleep", "60"])
    try:
        for parent in (tree.base, tree.freezer):
            if parent is not None:
                (parent / name).mkdir()
                (parent / name / "cgroup.procs").write_text(str(survivor.pid))
        tree.sweep()
        assert survivor.wait(timeout=5) == -signal.SIGKILL
        assert not (tree.base / name).exists()
    finally:
        survivor.kill()
        survivor.wait()
        for parent in (tree.base, tree.freezer):
            if parent is not None and (parent / name).exists():
                (parent / name).rmdir()


def test_processes_a_dead_worker_left_with_a_per_call_uid_are_swept() -> None:
    if not AS_ROOT:
        pytest.skip("a uid of the call's own needs a root worker (CI runs this as root)")
    pool = containment.UidPool(containment._lock_dir())
    uid = containment.UID_BASE + containment.UID_COUNT - 1
    survivor = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
    try:
        wait_until(lambda: containment._real_uid(survivor.pid) == uid, 5, "the survivor's uid")
        pool.sweep()
        assert survivor.wait(timeout=5) == -signal.SIGKILL
    finally:
        survivor.kill()
        survivor.wait()
