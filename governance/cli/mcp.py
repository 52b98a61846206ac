"""``govctl mcp``: serve the deployment's governed tools to MCP agents, and manage their tokens.

``serve`` runs the MCP server (:mod:`governance.mcp`) over stdio (a local agent starts it, bound
to ``--tenant``/``--agent``) or streamable HTTP (remote agents, each identified by a bearer
token from the token file). ``token add|list|remove`` manage that file (only hashes are stored;
a new token is printed once). ``tools`` shows what an agent of a tenant would see in
``tools/list``. The ``mcp`` SDK is imported only by the commands that serve or list: ``govctl
--help`` imports neither it nor Celery nor redis.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

if TYPE_CHECKING:
    from governance.mcp.settings import McpSettings
    from governance.mcp.tokens import TokenFile

app = typer.Typer(
    help="Serve the governed tools to MCP agents (stdio or HTTP) and manage their tokens.",
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="Bearer tokens of the HTTP transport (the file stores their hashes only).",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")

Tenant = Annotated[str, typer.Option("--tenant", "-t", help="The tenant the agent acts for.")]
Agent = Annotated[str, typer.Option("--agent", "-a", help="The agent.")]
User = Annotated[
    str | None,
    typer.Option(
        "--user",
        "-u",
        help="The person the agent acts for (approval-tier tools need one: it may not approve "
        "its own calls).",
    ),
]
Tokens = Annotated[
    Path | None,
    typer.Option(
        "--tokens",
        help="The token file (default: GOVERNANCE_MCP_TOKENS).",
        dir_okay=False,
    ),
]


def _mcp_settings(**overrides: Any) -> McpSettings:
    from pydantic import ValidationError

    from governance.mcp.settings import McpSettings

    try:
        base = McpSettings()
        return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise CliError(f"invalid settings: {exc}", ExitCode.INVALID_CONFIG) from None


def _token_file(path: Path | None) -> TokenFile:
    from governance.mcp.tokens import TokenFile

    chosen = path or _mcp_settings().tokens
    if chosen is None:
        raise typer.BadParameter(
            "no token file: give --tokens PATH or set GOVERNANCE_MCP_TOKENS", param_hint="--tokens"
        )
    return TokenFile(chosen)


def _identifier(value: str | None, option: str) -> None:
    from governance.policy.context import validate_identifier

    if value is not None:
        try:
            validate_identifier(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from None


@contextlib.contextmanager
def _token_errors() -> Any:
    from governance.mcp.tokens import TokenFileError

    try:
        yield
    except TokenFileError as exc:
        raise CliError(str(exc), ExitCode.INVALID_CONFIG) from None


@token_app.command("add")
def token_add(
    tenant: Tenant,
    agent: Agent,
    user: User = None,
    label: Annotated[str, typer.Option("--label", help="A note: whose agent, where.")] = "",
    tokens: Tokens = None,
    as_json: JsonFlag = False,
) -> None:
    """Make a token for an agent of a tenant: printed once, only its hash is stored.

    Example: govctl mcp token add --tenant acme --agent planner --user carol --tokens tokens.json
    """
    for value, option in ((tenant, "--tenant"), (agent, "--agent"), (user, "--user")):
        _identifier(value, option)
    context.check_tenant(context.load_policy(), tenant)
    file = _token_file(tokens)
    with _token_errors():
        token, identity = file.add(tenant, agent, user, label)
    if as_json:
        output.emit_json({"token": token, **identity.as_dict(), "file": str(file.path)})
        return
    output.emit_line(token)
    output.note(
        f"token {identity.token_id} for agent {agent!r} of tenant {tenant!r}"
        + (f" acting for {user!r}" if user else "")
        + f" added to {file.path}; it is shown this once (the file keeps its hash only): "
        "agents send it as `Authorization: Bearer <token>`"
    )


@token_app.command("list")
def token_list(tokens: Tokens = None, as_json: JsonFlag = False) -> None:
    """The tokens of the file: id (the start of the hash), tenant, agent, user, label."""
    file = _token_file(tokens)
    with _token_errors():
        entries = sorted(file.entries().values(), key=lambda e: (e.tenant, e.agent, e.token_id))
    if as_json:
        output.emit_json({"file": str(file.path), "tokens": [e.as_dict() for e in entries]})
        return
    table = output.table("id", "tenant", "agent", "user", "label", "created", title=str(file.path))
    for entry in entries:
        output.add_row(
            table,
            entry.token_id,
            entry.tenant,
            entry.agent,
            entry.user or "",
            entry.label,
            output.when(entry.created_ms or None),
        )
    output.show(table)


@token_app.command("remove")
def token_remove(
    token_id: Annotated[str, typer.Argument(help="The token's id (at least 8 hex digits).")],
    tokens: Tokens = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove a token: the server refuses it from its next request on."""
    file = _token_file(tokens)
    with _token_errors():
        try:
            removed = file.remove(token_id)
        except KeyError as exc:
            raise CliError(str(exc.args[0]), ExitCode.REFUSED) from None
    if as_json:
        output.emit_json({"removed": removed.as_dict(), "file": str(file.path)})
        return
    output.emit_line(
        f"removed token {removed.token_id} (agent {removed.agent!r} of tenant {removed.tenant!r})"
    )


@app.command("tools")
def tools(
    tenant: Tenant,
    agent: Agent,
    user: User = None,
    as_json: JsonFlag = False,
) -> None:
    """What `tools/list` shows an agent of a tenant: the tools the policy does not deny it
    outright, with their tier (hooks decide per call)."""
    from governance.mcp.catalog import Catalog

    _identifier(agent, "--agent")
    _identifier(user, "--user")
    runtime = context.runtime()
    context.check_tenant(runtime.policy, tenant)
    catalog = Catalog(context.celery_app(), runtime.policy)
    listed = catalog.listed(runtime.policy, tenant, agent, user)
    if as_json:
        output.emit_json(
            {
                "tenant": tenant,
                "agent": agent,
                "user": user,
                "tools": [
                    {
                        "name": item.entry.name,
                        "task": item.entry.task_name,
                        "tier": item.tier,
                        "rule": item.decision.rule,
                        "description": item.description(),
                        "input_schema": item.entry.input_schema,
                    }
                    for item in listed
                ],
            }
        )
        return
    table = output.table("tool", "tier", "task", "rule", title=f"{tenant}/{agent}")
    for item in listed:
        output.add_row(table, item.entry.name, item.tier, item.entry.task_name, item.decision.rule)
    output.show(table)
    hidden = sorted(set(catalog.entries) - {item.entry.name for item in listed})
    if hidden:
        output.note(f"not listed (denied outright): {', '.join(hidden)}")


@app.command("serve")
def serve(
    transport: Annotated[
        str,
        typer.Option(
            "--transport",
            help="stdio (a local agent starts the server; --tenant and --agent bind it) or "
            "http (streamable HTTP; bearer tokens from --tokens bind each request).",
        ),
    ] = "stdio",
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="stdio: the tenant the agent acts for.")
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", "-a", help="stdio: the agent.")] = None,
    user: User = None,
    run: Annotated[
        str | None,
        typer.Option("--run", help="stdio: the run its calls belong to (default: one of its own)."),
    ] = None,
    tokens: Tokens = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="http: the address (default 127.0.0.1, loopback)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="http: the port (default 8765; 0: any free).")
    ] = None,
    path: Annotated[
        str | None, typer.Option("--path", help="http: the endpoint's path (default /mcp).")
    ] = None,
    call_timeout: Annotated[
        float | None,
        typer.Option(
            "--call-timeout",
            min=0.001,
            metavar="SECONDS",
            help="How long a call waits for its task before answering with its id "
            "(default 60; GOVERNANCE_MCP_CALL_TIMEOUT_S).",
        ),
    ] = None,
    cancel_running: Annotated[
        str | None,
        typer.Option(
            "--cancel-running",
            help="What a cancelled call does to a task already running: leave (default) or "
            "terminate.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Announce the server as one JSON line (stdio: on stderr; http: on stdout).",
        ),
    ] = False,
) -> None:
    """Serve the deployment's governed tools over MCP until stopped (Ctrl-C or SIGTERM).

    Examples: govctl mcp serve --tenant acme --agent planner --user carol (an MCP client runs
    this as a stdio server); govctl mcp serve --transport http --tokens tokens.json --port 8765
    """
    if transport not in ("stdio", "http"):
        raise typer.BadParameter("stdio or http", param_hint="--transport")
    _require_sdk()
    if cancel_running not in (None, "leave", "terminate"):
        raise typer.BadParameter("leave or terminate", param_hint="--cancel-running")
    settings = _mcp_settings(
        host=host,
        port=port,
        path=path,
        call_timeout_s=call_timeout,
        cancel_running=cancel_running,
        tokens=tokens,
    )
    if transport == "stdio":
        _serve_stdio(settings, tenant, agent, user, run, as_json)
    else:
        for given, option in ((tenant, "--tenant"), (agent, "--agent"), (run, "--run")):
            if given is not None:
                raise typer.BadParameter(
                    "http: each request's token names its tenant and agent", param_hint=option
                )
        _serve_http(settings, as_json)


def _require_sdk() -> None:
    """Serving needs the MCP SDK, an optional dependency: say how to install it."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise CliError(
            "govctl mcp serve needs the MCP SDK: pip install 'celery-governance[mcp]'",
            ExitCode.INVALID_CONFIG,
        ) from None


def _deployment() -> tuple[Any, Any]:
    """The app and its runtime, loaded with stdout kept clean (stdio speaks on it)."""
    with contextlib.redirect_stdout(sys.stderr):
        return context.celery_app(), context.runtime()


def _announce(payload: dict[str, Any], text: str, as_json: bool, *, stdout: bool) -> None:
    line = json.dumps(payload) if as_json else f"govctl mcp: {text}"
    stream = sys.stdout if stdout and as_json else sys.stderr
    print(line, file=stream, flush=True)


def _serve_stdio(
    settings: McpSettings,
    tenant: str | None,
    agent: str | None,
    user: str | None,
    run: str | None,
    as_json: bool,
) -> None:
    import anyio

    from governance.mcp.serve import build_server, serve_stdio, stdio_caller

    if tenant is None or agent is None:
        raise typer.BadParameter("stdio needs --tenant and --agent", param_hint="--tenant")
    for value, option in ((tenant, "--tenant"), (agent, "--agent"), (user, "--user")):
        _identifier(value, option)
    _identifier(run, "--run")
    celery_app, runtime = _deployment()
    context.check_tenant(runtime.policy, tenant)
    caller = stdio_caller(tenant, agent, user, run)
    server = build_server(celery_app, runtime, settings, lambda _ctx: caller)
    payload = {
        "transport": "stdio",
        "tenant": tenant,
        "agent": agent,
        "user": user,
        "run": caller.run,
    }

    def ready() -> None:
        _announce(
            payload,
            f"serving agent {agent!r} of tenant {tenant!r} over stdio (run {caller.run})",
            as_json,
            stdout=False,
        )

    anyio.run(serve_stdio, server, ready)


def _serve_http(settings: McpSettings, as_json: bool) -> None:
    import anyio

    from governance.mcp.serve import build_server, http_caller, serve_http

    file = _token_file(settings.tokens)
    with _token_errors():
        if not file.entries():
            raise CliError(
                f"no tokens in {file.path}: every request would be refused; add one with "
                "`govctl mcp token add --tenant T --agent A --tokens PATH`"
            )
    celery_app, runtime = _deployment()
    server = build_server(celery_app, runtime, settings, http_caller)

    def ready(url: str) -> None:
        _announce(
            {"transport": "http", "url": url, "tokens": str(file.path)},
            f"serving {url} (tokens: {file.path}); Ctrl-C stops it",
            as_json,
            stdout=True,
        )

    try:
        anyio.run(serve_http, server, settings, file, ready)
    except SystemExit as exc:  # uvicorn exits when it cannot listen
        if exc.code not in (0, None):
            raise CliError(
                f"cannot serve on {settings.host}:{settings.port} (see the log above)"
            ) from None
