"""The demo's closing "Explore" section, printed by the demo's own function in a process whose
output is piped (as under CI or `make demo | tee`): its ``export`` line stays one line, and sets
what govctl needs to work on the demo (its policy file too, quoted for the shell)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_export_line_never_wraps_when_piped() -> None:
    settings = {
        "GOVERNANCE_BROKER_URL": "redis://127.0.0.1:40123/0",
        "GOVERNANCE_STATE_REDIS_URL": "redis://127.0.0.1:40123/1",
        "GOVERNANCE_AUDIT_KEY": "a1" * 16,
        "GOVERNANCE_CONFIG_PATH": "/work/my demo/.demo/governance.yaml",
        "GOVERNANCE_WORKSPACE_DIR": "/not/exported",
    }
    script = (
        "import json, sys\n"
        "from workers.demo import print_explore\n"
        "print_explore(5555, 'pw', json.loads(sys.argv[1]))\n"
    )
    for columns in (None, "80", "40"):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        if columns:
            env["COLUMNS"] = columns
        result = subprocess.run(
            [sys.executable, "-c", script, json.dumps(settings)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        (line,) = [x for x in result.stdout.splitlines() if "export" in x]
        exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in list(settings.items())[:4])
        assert line == f"Explore: export {exported}", (columns, result.stdout)
        assert "/not/exported" not in result.stdout
        assert "govctl audit verify" in result.stdout
