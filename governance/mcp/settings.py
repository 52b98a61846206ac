"""Settings of the MCP server, from ``GOVERNANCE_MCP_*`` environment variables (``govctl mcp
serve`` options override them). The deployment's own settings (broker, state Redis, policy,
``GOVERNANCE_APP``) are the workers' ``GOVERNANCE_*`` ones, read as ``govctl`` reads them.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CancelRunning(StrEnum):
    """What cancelling an MCP request does to a task that has already started."""

    #: Nothing: it runs to its end (its result can still be fetched by id).
    LEAVE = "leave"
    #: Revoke it with ``terminate=True`` (SIGTERM to the pool process running it).
    TERMINATE = "terminate"


class McpSettings(BaseSettings):
    """How the MCP server serves: where tokens are, how long a call waits, cancellation."""

    model_config = SettingsConfigDict(env_prefix="GOVERNANCE_MCP_", extra="forbid")

    #: The token file of the HTTP transport (``govctl mcp token add`` writes it).
    tokens: Path | None = None
    #: How long a ``tools/call`` (or ``governance_result``) waits for the task before it
    #: answers with where the task is and how to follow it. A client may ask for less (or,
    #: up to ``max_wait_s``, more) with ``_meta["governance/wait_s"]``.
    call_timeout_s: float = Field(default=60.0, gt=0)
    #: The longest wait a client may ask for.
    max_wait_s: float = Field(default=600.0, gt=0)
    #: How often a waiting call reads the task's state (the first reads come sooner).
    poll_s: float = Field(default=0.5, gt=0)
    #: Cancelling a request revokes a task that has not started; a started one is left to
    #: finish unless this says ``terminate``.
    cancel_running: CancelRunning = CancelRunning.LEAVE
    #: The HTTP transport's address: loopback unless told otherwise (put TLS or a proxy in
    #: front for remote agents).
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    path: str = "/mcp"
