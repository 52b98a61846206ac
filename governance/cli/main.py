"""``govctl``: the admin CLI of the governance layer, for reviewers and operators.

Commands::

    govctl held list [--tenant T] [--status S] [--limit N] [--cursor C]
    govctl held show ID
    govctl held approve ID [--key PATH] [--reason R] [--grant DURATION]
    govctl held reject ID [--key PATH] --reason R
    govctl held expire
    govctl reviewers keygen NAME [--out PATH]
    govctl reviewers list [--tenant T]
    govctl grants list [--tenant T]
    govctl grants revoke ID --tenant T
    govctl submit tool TOOL --tenant T --agent A --run R [--input JSON | -i key=value ...]
    govctl submit llm --provider P --model M --message TEXT --max-tokens N ...
    govctl usage [--tenant T] [--run R]
    govctl status [--tenant T] [--overdue]
    govctl audit tail [-n N]
    govctl audit verify
    govctl policy check [FILE]
    govctl policy explain --tenant T --agent A --action X
    govctl dev redis [--dir .govredis] [--port 6379]

Listings take ``--json``. Settings come from the same ``GOVERNANCE_*`` environment variables as
the workers (``governance.settings.GovernanceSettings``); a reviewer signs with the key given by
``--key`` or ``GOVERNANCE_REVIEWER_KEY``.

Exit codes (``ExitCode``; the same table is in ``govctl --help`` and the README):

- 0: ok
- 1: refused, denied or not found (a one-line ``error: ...`` on stderr): an unknown task,
  tenant, tool or grant, invalid input, a decision the rules forbid; with ``--wait``, a task
  that did not succeed (denied, failed, rejected, still held, or not done in time)
- 2: usage error (bad options or arguments)
- 3: the state Redis (``GOVERNANCE_STATE_REDIS_URL``) is unreachable
- 4: audit verification failed (the broken entry is named)
- 5: invalid configuration: the policy file (every problem as ``file: field.path: reason``),
  ``GOVERNANCE_*`` settings or ``GOVERNANCE_APP``
- 6: the Celery broker (``GOVERNANCE_BROKER_URL``) is unreachable

None of these prints a Python traceback.
"""

from __future__ import annotations

import logging
import sys

import typer

from governance.cli import (
    audit,
    dev,
    grants,
    held,
    mcp,
    policy,
    reviewers,
    runs,
    status,
    submit,
    tenants,
    usage,
)
from governance.cli.errors import EXIT_CODES, ExitCode, classify
from governance.cli.output import error

EPILOG = (
    "**Exit codes:**\n\n"
    + "\n".join(f"- {int(code)}: {meaning}" for code, meaning in EXIT_CODES.items())
    + """

Settings come from the workers' `GOVERNANCE_*` environment variables: `GOVERNANCE_BROKER_URL`,
`GOVERNANCE_STATE_REDIS_URL`, `GOVERNANCE_CONFIG_PATH`, `GOVERNANCE_AUDIT_KEY`,
`GOVERNANCE_APP` (the deployment's Celery app, `module:attr`), ...
"""
)

app = typer.Typer(
    name="govctl",
    help="Govern AI-agent actions on Celery: review held actions, submit actions, read usage, "
    "verify the audit log, check and explain the policy.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(held.app, name="held")
app.add_typer(reviewers.app, name="reviewers")
app.add_typer(grants.app, name="grants")
app.add_typer(runs.app, name="run", no_args_is_help=True)
app.add_typer(tenants.app, name="tenants")
app.add_typer(tenants.limits, name="limits", no_args_is_help=True)
app.add_typer(submit.app, name="submit")
app.command("usage")(usage.usage)
app.command("status")(status.status)
app.add_typer(audit.app, name="audit", no_args_is_help=True)
app.add_typer(policy.app, name="policy")
app.add_typer(dev.app, name="dev")
app.add_typer(mcp.app, name="mcp")


class _OneLineFormatter(logging.Formatter):
    """Library log records as one line (``<logger>: warning: ... (cause)``), no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        text = f"{record.name}: {record.levelname.lower()}: {message}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]})"
        return text


def _quiet_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Run govctl; known failures become an ``error:`` line and their exit code."""
    _quiet_logging()
    try:
        app(args=argv, prog_name="govctl")
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except Exception as exc:
        known = classify(exc)
        if known is None:
            raise  # a bug: keep the traceback
        code, lines = known
        error("\n".join(lines))
        sys.exit(int(code))
    sys.exit(int(ExitCode.OK))


if __name__ == "__main__":
    main()
