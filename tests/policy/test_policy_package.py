"""The package surface: public names are exported, and importing stays light."""

from __future__ import annotations

import subprocess
import sys

import governance

PUBLIC = [
    "ActionContext",
    "ToolCall",
    "LLMCall",
    "Message",
    "Action",
    "ActionError",
    "ErrorKind",
    "classify_http_status",
    "parse_retry_after",
    "RetryPolicy",
    "Policy",
    "Decision",
    "Outcome",
    "Tier",
    "Grant",
    "HookDecision",
    "ConfigError",
    "Allowed",
    "NearLimit",
    "Blocked",
    "LimitResult",
    "Violation",
    "LimitWarning",
    "ViolationType",
    "check_limit",
    "LongRunningLimits",
    "PRESETS",
    "Usage",
    "TenantPolicy",
]


def test_public_names_are_exported_from_governance() -> None:
    missing = [name for name in PUBLIC if not hasattr(governance, name)]
    assert missing == []
    assert set(PUBLIC) <= set(governance.__all__)


def test_importing_governance_does_not_import_celery_or_redis() -> None:
    code = (
        "import sys, governance\n"
        "heavy = sorted(m for m in ('celery', 'kombu', 'redis') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
