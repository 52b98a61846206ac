"""``govctl tenants`` and ``govctl limits``: steer fair dispatch while it runs.

``govctl tenants pause NAME`` stops a tenant's new work: its running tasks finish, nothing of it
starts, its tasks wait (and are not failed by ``max_wait`` while it is paused; their limit counts
again from the resume). ``govctl tenants resume NAME`` lets it go on. ``govctl limits override
TENANT concurrency=N weight=W --for 1h`` sets its concurrency and/or its share of a saturated
pool for a while; it reverts by itself (``--clear`` ends it now). The scripts read these on
every call (nothing is cached by a process), and every change is audited on the tenant's chain
with the operator's name. Anyone who can write the state Redis can change them too (see
docs/trust.md). ``govctl tenants end NAME`` ends now the open tasks of a tenant that was removed
from the policy (otherwise they end after a grace: its ``max_wait``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.options import positive_duration
from governance.cli.output import JsonFlag

app = typer.Typer(
    help="Pause and resume a tenant's work (fair dispatch); end a removed tenant's tasks.",
    no_args_is_help=True,
)
limits = typer.Typer(help="Override a tenant's concurrency or weight for a while.")

Tenant = Annotated[str, typer.Argument(help="The tenant's name.", metavar="NAME")]


def _queues(celery_app: Any) -> list[str]:
    """The queues of the deployment's app (each has a worker pool)."""
    names = {str(celery_app.conf.task_default_queue)}
    names.update(str(name) for name in celery_app.amqp.queues)
    return sorted(names)


def _event(kind: str, tenant: str, reason: str, detail: dict[str, Any]) -> Any:
    from governance.store.audit import AuditEvent, AuditEventType

    return AuditEvent(
        type=AuditEventType(kind),
        tenant=tenant,
        decision="allow",
        reason=reason,
        reviewer=context.operator(),
        policy_version=context.runtime().policy.version,
        detail=detail,
    )


def _controls() -> Any:
    from governance.store.control import Controls

    runtime = context.runtime()
    return Controls(runtime.state, runtime.audit_log)


def _after(tenant: str) -> list[str]:
    """What a change lets go on now: the tenant's waiting tasks that fit are handed on (or,
    in a saturated pool, its tenant is registered for its share); the ids published."""
    runtime = context.runtime()
    tenant_policy = runtime.policy.tenant(tenant)
    weight = tenant_policy.weight if tenant_policy else 1.0
    saturated = [q for q in _queues(context.celery_app()) if runtime.pool_view.saturated(q)]
    published = runtime.sweep_tenant(tenant, pool_gated=bool(saturated))
    for queue in saturated:
        runtime.pool_view.pools.dispatch(queue, register=[(tenant, weight)], give=False)
    runtime.audit_log.flush(tenant)
    return [p.task_id for p in published]


@app.command("pause")
def pause(tenant: Tenant, as_json: JsonFlag = False) -> None:
    """Pause a tenant: its running tasks finish, nothing of it starts, its tasks wait (audited)."""
    runtime = context.runtime()
    context.check_tenant(runtime.policy, tenant)
    event = _event("tenant_paused", tenant, "paused by an operator: nothing of it starts", {})
    _controls().pause(tenant, event)
    runtime.audit_log.flush(tenant)
    if as_json:
        output.emit_json({"tenant": tenant, "paused": True})
        return
    output.show(f"tenant {tenant} is paused: its tasks wait until `govctl tenants resume {tenant}`")


@app.command("resume")
def resume(tenant: Tenant, as_json: JsonFlag = False) -> None:
    """Resume a paused tenant: its waiting tasks go on, their wait limit counting from now."""
    runtime = context.runtime()
    context.check_tenant(runtime.policy, tenant)
    _controls().resume(tenant, _event("tenant_resumed", tenant, "resumed by an operator", {}))
    published = _after(tenant)
    if as_json:
        output.emit_json({"tenant": tenant, "paused": False, "published": published})
        return
    output.show(f"tenant {tenant} is resumed; {len(published)} waiting task(s) handed on")


@app.command("end")
def end(tenant: Tenant, as_json: JsonFlag = False) -> None:
    """End now the open tasks of a tenant removed from the policy (audited), without waiting
    out its grace: each ends with "tenant removed from the policy"; running ones finish."""
    from governance.integration.worker.removed_tenants import end_tasks

    runtime = context.runtime()
    if runtime.policy.tenant(tenant) is not None:
        raise CliError(
            f"tenant {tenant!r} is in the policy: only the tasks of a tenant removed from it can "
            f"be ended (govctl tenants pause {tenant} stops its new work)",
            ExitCode.REFUSED,
        )
    removed = runtime.removed_tenants
    listed = {r.tenant: r for r in removed.removed(runtime.policy.tenant_names)}
    found = listed.get(tenant)
    if found is None or (found.open == 0 and found.held == 0):
        others = ", ".join(n for n, r in listed.items() if r.open or r.held) or "none"
        raise CliError(
            f"tenant {tenant!r} has no open tasks (removed tenants with open tasks: {others})",
            ExitCode.REFUSED,
        )
    removed.notice(tenant, 0, by=context.operator())
    ended = end_tasks(context.celery_app(), runtime, tenant)
    if as_json:
        output.emit_json(
            {
                "tenant": tenant,
                "published": ended.published,
                "held": ended.held,
                "open": ended.open,
            }
        )
        return
    output.show(
        f"tenant {tenant}: {ended.published} task(s) sent to end with 'tenant removed from the "
        f"policy', {ended.held} held task(s) ended; {ended.open} still open (running tasks "
        "finish, queued ones end when a worker receives them)"
    )


@limits.command("override")
def override(
    tenant: Annotated[str, typer.Argument(help="The tenant's name.", metavar="TENANT")],
    settings: Annotated[
        list[str] | None,
        typer.Argument(
            help="concurrency=N and/or weight=W (W > 0).", metavar="concurrency=N|weight=W"
        ),
    ] = None,
    for_: Annotated[
        str,
        typer.Option("--for", help="How long it lasts (e.g. 30m, 1h); it reverts by itself."),
    ] = "1h",
    clear: Annotated[bool, typer.Option("--clear", help="End the tenant's overrides now.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Set a tenant's concurrency and/or weight for a while (audited); it reverts by itself."""
    runtime = context.runtime()
    context.check_tenant(runtime.policy, tenant)
    queues = _queues(context.celery_app())
    if clear:
        event = _event("limits_overridden", tenant, "overrides cleared by an operator", {})
        _controls().clear(tenant, queues, event)
        published = _after(tenant)
        if as_json:
            output.emit_json({"tenant": tenant, "cleared": True, "published": published})
            return
        output.show(f"tenant {tenant}: overrides cleared; the policy's limits are in force")
        return
    concurrency, weight = _parse(settings or [])
    duration = positive_duration(for_, "--for", "an override")
    until_ms = int((time.time() + duration.total_seconds()) * 1000)
    detail = {"concurrency": concurrency, "weight": weight, "until_ms": until_ms}
    reason = f"overridden by an operator for {for_}: " + ", ".join(
        f"{k}={v}" for k, v in (("concurrency", concurrency), ("weight", weight)) if v is not None
    )
    event = _event("limits_overridden", tenant, reason, {k: v for k, v in detail.items() if v})
    _controls().override(
        tenant,
        until_ms=until_ms,
        concurrency=concurrency,
        weight=weight,
        queues=queues,
        event=event,
    )
    published = _after(tenant)
    if as_json:
        output.emit_json({"tenant": tenant, **detail, "published": published})
        return
    output.show(f"tenant {tenant}: {reason.split(': ', 1)[1]} until {output.when(until_ms)}")


def _parse(settings: list[str]) -> tuple[int | None, float | None]:
    if not settings:
        raise typer.BadParameter("give concurrency=N and/or weight=W", param_hint="SETTINGS")
    concurrency: int | None = None
    weight: float | None = None
    for item in settings:
        name, _, value = item.partition("=")
        try:
            if name == "concurrency":
                concurrency = int(value)
                if concurrency < 0:
                    raise ValueError("must be >= 0")
            elif name == "weight":
                weight = float(value)
                if not 0 < weight <= 1000:
                    raise ValueError("must be > 0 and at most 1000")
            else:
                raise typer.BadParameter(
                    f"{item!r}: only concurrency=N and weight=W", param_hint="SETTINGS"
                )
        except ValueError as exc:
            raise typer.BadParameter(f"{item!r}: {exc}", param_hint="SETTINGS") from None
    return concurrency, weight
