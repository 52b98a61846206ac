"""``govctl audit``: read the newest audit entries, and verify the log's HMAC hash chain.

``verify`` walks the whole stream with the deployment's audit key (``GOVERNANCE_AUDIT_KEY``) and
names the first entry whose content or link does not hold: exit code 4.
"""

from __future__ import annotations

from typing import Annotated

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

app = typer.Typer(help="The tamper-evident audit log: tail it, verify its chain.")

COLUMNS = ("ts", "type", "tenant", "agent", "run", "task_id", "action", "decision", "reviewer")


@app.command("tail")
def tail(
    count: Annotated[
        int, typer.Option("-n", "--lines", min=1, max=100_000, help="How many entries.")
    ] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The newest audit entries, oldest first."""
    entries = context.runtime().audit_log.tail(count)
    if as_json:
        output.emit_json([{"id": e.id, **e.fields} for e in entries])
        return
    shown = output.table("entry", "when", *COLUMNS[1:], "reason", title="audit log")
    for e in entries:
        f = e.fields
        ts = int(f["ts"]) if f.get("ts", "").isdigit() else None
        output.add_row(
            shown, e.id, output.when(ts), *(f.get(c, "") for c in COLUMNS[1:]), f.get("reason", "")
        )
    output.show(shown)


@app.command("verify")
def verify(as_json: JsonFlag = False) -> None:
    """Check every entry's HMAC and its link to the one before; exit 4 naming a broken entry."""
    report = context.runtime().audit_log.verify()
    if as_json:
        output.emit_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "broken_entry": report.broken_entry,
                "reason": report.reason,
            }
        )
    elif report.ok:
        output.show(f"audit chain ok: {report.checked} entries verified")
    if not report.ok:
        raise CliError(
            f"audit verification failed at entry {report.broken_entry} after "
            f"{report.checked} good entries: {report.reason}",
            ExitCode.AUDIT_BROKEN,
        )
