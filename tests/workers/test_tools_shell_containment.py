"""`shell` is contained: no secrets of the worker, no network, and limits that stop a command.

These run real commands, as root (CI) and as an ordinary user. As root the command runs as the
unprivileged `shell_user` (nobody); otherwise as our own user, where the worker's secrets are
protected by making the worker non-dumpable. What cannot apply in one of the two cases is
skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from workers.tools import TOOLS, ToolEnv, validate_input
from workers.tools.sandbox import ShellLimits

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
SECRET = "sk-worker-secret-0123456789"


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
    if not AS_ROOT and result["isolation"]["network"] == "none":
        # The command runs in a user namespace of its own (made for the network namespace); the
        # kernel refuses it the /proc files of processes outside, hardened or not.
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
    assert "8 more processes than its user already runs" in info.value.message
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
