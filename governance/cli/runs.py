"""``govctl run``: agent runs as a tenant's ``run_concurrency`` counts them.

A run is in flight from its first admitted step until it has been idle for its idle timeout (the
tenant's ``long_running.idle_timeout_s``, 30 min when it has none), or until it is closed here.
Closing frees its run slot at once: the oldest waiting steps of other runs are handed on and
published by this command. A step of a closed run that arrives later opens it again.
"""

from __future__ import annotations

from typing import Annotated

import typer

from governance.cli import context, output
from governance.cli.output import JsonFlag

app = typer.Typer(help="Agent runs: close one, so its run slot goes to waiting runs.")


@app.command("close")
def close(
    run: Annotated[str, typer.Argument(help="The run's id (the context's `run`).", metavar="RUN")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The run's tenant.")],
    as_json: JsonFlag = False,
) -> None:
    """Close a run: it stops counting against the tenant's run_concurrency (audited), and the
    steps of waiting runs that now fit are published, oldest first."""
    from governance.policy.context import validate_identifier

    try:
        validate_identifier(run)
    except ValueError as exc:
        raise typer.BadParameter(f"{run!r}: {exc}", param_hint="RUN") from None
    by = context.operator()
    runtime = context.runtime()
    context.check_tenant(runtime.policy, tenant)
    was_in_flight, published = runtime.close_run(tenant, run, by)
    if as_json:
        output.emit_json(
            {
                "tenant": tenant,
                "run": run,
                "was_in_flight": was_in_flight,
                "published": [p.task_id for p in published],
            }
        )
        return
    state = "closed" if was_in_flight else "was not in flight; closed anyway"
    output.show(f"run {run} of tenant {tenant}: {state}")
    if published:
        output.show(
            f"published {len(published)} waiting task(s): {', '.join(p.task_id for p in published)}"
        )
