"""Serving the governed MCP server: over stdio for a local agent, streamable HTTP for remote ones.

- **stdio**: one connection, one agent; its tenant, agent, user and run come from the command
  line (a run of its own per server process when none is given).
- **streamable HTTP**: every request carries a bearer token, which the token file
  (:mod:`governance.mcp.tokens`) maps to a tenant, an agent and maybe a user; a missing or
  unknown token is answered 401 before anything else. The run of a request is its MCP session
  (2025 protocol versions), or, for 2026-07-28's sessionless requests, ``_meta["governance/
  run"]`` or the call itself. The server binds to loopback unless told otherwise (put TLS or a
  proxy in front for remote agents), and the SDK's DNS-rebinding protection checks ``Host`` and
  ``Origin`` on loopback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST

from governance.integration.runtime import GovernanceRuntime
from governance.mcp.catalog import Catalog
from governance.mcp.gateway import CeleryGateway
from governance.mcp.server import Caller, CallerOf, GovernedMcpServer
from governance.mcp.settings import McpSettings
from governance.mcp.tokens import TokenFile

log = logging.getLogger("governance.mcp")

#: Claims of the access token a bearer token stands for.
TENANT, AGENT, USER = "governance/tenant", "governance/agent", "governance/user"


def _version() -> str:
    try:
        return metadata.version("celery-governance")
    except metadata.PackageNotFoundError:
        return ""


def build_server(
    app: Any, runtime: GovernanceRuntime, settings: McpSettings, caller_of: CallerOf
) -> GovernedMcpServer:
    """The MCP server of a governed Celery app."""
    return GovernedMcpServer(
        CeleryGateway(app, runtime),
        Catalog(app, runtime.policy),
        settings,
        caller_of,
        version=_version(),
    )


def stdio_caller(tenant: str, agent: str, user: str | None, run: str | None) -> Caller:
    """The caller of a stdio connection: the command line's, with a run of its own if none."""
    return Caller(tenant=tenant, agent=agent, user=user, run=run or f"mcp-{uuid.uuid4().hex}")


async def serve_stdio(mcp: GovernedMcpServer, ready: Callable[[], None]) -> None:
    """Serve one connection on stdin/stdout until the client closes it."""
    server = mcp.server
    async with stdio_server() as (read, write):
        ready()
        await server.run(read, write, server.create_initialization_options())


class TokenFileVerifier:
    """The SDK's ``TokenVerifier`` over a token file: a known token is an access token whose
    claims are its tenant, agent and user; anything else is refused (401)."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            identity = self.tokens.lookup(token)
        except ValueError as exc:  # a broken token file refuses everyone, loudly
            log.error("token file unusable, request refused: %s", exc)
            return None
        if identity is None:
            return None
        return AccessToken(
            token=token,
            client_id=f"token-{identity.token_id}",
            scopes=[],
            claims={TENANT: identity.tenant, AGENT: identity.agent, USER: identity.user},
        )


def http_caller(ctx: ServerRequestContext[Any, Any]) -> Caller:
    """The caller of an HTTP request: its token's identity; the run is its MCP session."""
    request = ctx.request
    user = request.scope.get("user") if request is not None else None
    if not isinstance(user, AuthenticatedUser):  # the auth middleware lets nobody else in
        raise MCPError(code=INVALID_REQUEST, message="unauthenticated request")
    claims = user.access_token.claims or {}
    session = request.headers.get(MCP_SESSION_ID_HEADER) if request is not None else None
    return Caller(
        tenant=str(claims[TENANT]),
        agent=str(claims[AGENT]),
        user=claims.get(USER),
        run=f"mcp-{session}" if session else None,
    )


async def serve_http(
    mcp: GovernedMcpServer,
    settings: McpSettings,
    tokens: TokenFile,
    ready: Callable[[str], None],
) -> None:
    """Serve streamable HTTP on ``settings.host``:``settings.port`` (0: any free port) until
    SIGINT or SIGTERM; ``ready`` gets the URL once it listens."""
    import uvicorn

    base = f"http://{settings.host}:{settings.port}"
    app = mcp.server.streamable_http_app(
        streamable_http_path=settings.path,
        host=settings.host,
        auth=AuthSettings(issuer_url=base, resource_server_url=None),
        token_verifier=TokenFileVerifier(tokens),
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    mcp.closing = lambda: bool(server.should_exit)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.02)
        port = settings.port
        for listener in server.servers:
            for sock in listener.sockets:
                port = sock.getsockname()[1]
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        ready(f"http://{host}:{port}{settings.path}")
