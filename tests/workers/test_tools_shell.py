"""`shell` runs real processes in the workspace."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from workers.tools import TOOLS, InputRejected, ToolEnv, containment, validate_input

#: Whether the tests run `shell` in best effort (set by the fixture below, and by some tests).
BEST_EFFORT = False


@pytest.fixture(autouse=True)
def best_effort_without_containment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the worker can contain no call (not root, no writable cgroup: a developer's
    machine) `shell` refuses to run; these tests then run it in best effort. CI runs them as
    root, contained (tests/workers/test_tools_shell_containment.py checks how)."""
    available = containment.detect()
    if available.cgroup is None and available.uids is None:
        monkeypatch.setattr(sys.modules[__name__], "BEST_EFFORT", True)


def shell(command: list[str], workspace: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    env = ToolEnv(workspace=workspace, shell_timeout_s=timeout_s, shell_best_effort=BEST_EFFORT)
    spec = TOOLS["shell"]
    return spec.run(validate_input(spec, {"command": command}, env), env)


def test_runs_argv_and_captures_output(workspace: Path) -> None:
    result = shell(["echo", "hi"], workspace)
    isolation = result.pop("isolation")
    assert result == {
        "returncode": 0,
        "stdout": "hi\n",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
    }
    assert set(isolation) == {"user", "network", "containment"}
    assert isolation["network"] == "none" or isolation["network"].startswith("shared: ")
    assert isolation["containment"]


def test_a_pipe_closed_early_ends_the_writer_quietly(workspace: Path) -> None:
    """SIGPIPE has its default action in the command (the Python launcher ignores it)."""
    result = shell(["sh", "-c", "yes | head -n 2"], workspace)
    assert result["returncode"] == 0
    assert result["stdout"] == "y\ny\n"
    assert result["stderr"] == ""


def test_argv_is_not_interpreted_by_a_shell(workspace: Path) -> None:
    assert shell(["echo", "$HOME; rm -rf ."], workspace)["stdout"] == "$HOME; rm -rf .\n"


def test_runs_in_the_workspace_with_a_minimal_environment(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET_KEY", "sk-should-not-leak")
    assert Path(shell(["pwd"], workspace)["stdout"].strip()).resolve() == workspace.resolve()
    env_out = shell(["env"], workspace)["stdout"]
    assert "sk-should-not-leak" not in env_out
    assert f"HOME={workspace}" in env_out.splitlines()


def test_nonzero_exit_and_stderr_are_a_result(workspace: Path) -> None:
    result = shell(["sh", "-c", "echo oops >&2; exit 3"], workspace)
    assert result["returncode"] == 3
    assert result["stderr"] == "oops\n"


def test_output_is_capped(workspace: Path) -> None:
    result = shell(["head", "-c", "200000", "/dev/zero"], workspace)
    assert result["returncode"] == 0
    assert len(result["stdout"]) == 64 * 1024
    assert result["stdout_truncated"] is True


def test_missing_executable_is_permanent(workspace: Path) -> None:
    with pytest.raises(ActionError, match="no such executable: no-such-program-xyz") as info:
        shell(["no-such-program-xyz"], workspace)
    assert info.value.kind is ErrorKind.permanent


def test_timeout_is_transient_and_kills_the_process(workspace: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ActionError, match=r"timed out after 0\.3 s: sleep") as info:
        shell(["sleep", "30"], workspace, timeout_s=0.3)
    assert info.value.kind is ErrorKind.transient
    assert time.monotonic() - started < 10


def test_a_background_grandchild_does_not_keep_the_call_waiting(workspace: Path) -> None:
    started = time.monotonic()
    result = shell(["sh", "-c", "sleep 30 & echo started"], workspace)
    assert result["stdout"] == "started\n"
    assert time.monotonic() - started < 10


def test_nul_bytes_and_empty_program_are_rejected(workspace: Path) -> None:
    with pytest.raises(InputRejected, match=r"command\[1\] contains a NUL byte"):
        shell(["echo", "a\0b"], workspace)
    with pytest.raises(InputRejected, match=r"command\[0\] must name a program"):
        shell([""], workspace)
