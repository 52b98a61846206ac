"""Deployment settings shared by workers, publishers and ``govctl``: one model, read from env.

Every field can be set with an environment variable named ``GOVERNANCE_<FIELD>`` (for example
``GOVERNANCE_BROKER_URL``), so the same settings drive a laptop demo, docker-compose and
production. Secrets are :class:`pydantic.SecretStr` so they never appear in logs or reprs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Used only when no key is configured; fine for a laptop, refused when ``require_secrets``.
DEVELOPMENT_SECRET = "development-only-secret-change-me"


class GovernanceSettings(BaseSettings):
    """Where the broker and the governance state live, the policy file, and timings."""

    model_config = SettingsConfigDict(env_prefix="GOVERNANCE_", extra="forbid")

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker (Redis) that carries the tasks."
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; defaults to the broker URL."
    )
    state_redis_url: str | None = Field(
        None,
        description="Redis holding governance state (leases, budgets, held tasks, audit); "
        "defaults to the broker URL.",
    )
    state_redis_cluster: bool = Field(False, description="The state Redis is a Redis Cluster.")
    state_timeout_s: float = Field(
        2.0, gt=0, description="Connect/read timeout for the state Redis: fail closed, fast."
    )
    config_path: Path = Field(
        Path("config/governance.yaml"), description="The governance policy file."
    )
    audit_key: SecretStr = Field(
        SecretStr(DEVELOPMENT_SECRET), description="HMAC key of the audit hash chain."
    )
    require_secrets: bool = Field(
        False, description="Refuse to start with the development secrets (set in production)."
    )
    lease_ms: int = Field(
        30_000, ge=100, description="Concurrency lease; a killed worker's slot frees after it."
    )
    heartbeat_ms: int | None = Field(
        None, ge=10, description="Lease renewal interval; defaults to a third of the lease."
    )
    visibility_timeout_s: int = Field(
        3600,
        ge=1,
        description="Redis broker visibility timeout: unacked messages are redelivered after it.",
    )
    max_countdown_s: float | None = Field(
        None,
        gt=0,
        description="Longest delay kept as a broker countdown; longer waits are parked in Redis. "
        "Defaults to a quarter of the visibility timeout.",
    )
    sweep_poll_s: float = Field(
        0.5,
        gt=0,
        description="How often the maintenance leader sweeps the ledger: publishes parked tasks "
        "that are due and tasks that were lost, and hands free capacity to waiting tasks.",
    )
    reconcile_after_s: float = Field(
        60.0,
        gt=0,
        description="How long a published task may go unreceived before the reconciler publishes "
        "it again (doubling each time, up to an hour); also the longest a hand-off may travel.",
    )
    settle_patience_s: float = Field(
        300.0,
        gt=0,
        description="How long a worker keeps trying to settle a finished task while the state "
        "store is down, before it gives up (its lease then expires and the reconciler decides).",
    )
    seal_grace_s: float = Field(
        30.0,
        gt=0,
        description="Audit entries younger than this may still be unsealed (pending); older ones "
        "left unsealed by a killed writer are sealed by the maintenance leader (adopted).",
    )
    audit_checkpoint_s: float = Field(
        60.0, gt=0, description="How often the maintenance leader signs where each chain ends."
    )
    held_sweep_s: float = Field(
        5.0, gt=0, description="How often a worker rejects held tasks whose hold expired."
    )
    app: str = Field(
        "workers.app:app", description="The deployment's Celery app, for govctl (module:attr)."
    )
    workspace_dir: Path = Field(
        Path(".workspace"), description="The only directory the file tools may touch."
    )
    http_timeout_s: float = Field(
        10.0, gt=0, description="Total deadline of one http_get request (connect and all reads)."
    )
    shell_user: str = Field(
        "nobody",
        min_length=1,
        description="The unprivileged user the shell tool runs commands as when the worker runs "
        "as root (it is given the workspace directory); a worker that is not root runs them as "
        "its own user.",
    )
    shell_isolate_network: bool = Field(
        True,
        description="Run shell commands in a network namespace of their own, without network, "
        "when the kernel allows it (the result's isolation says whether it did).",
    )
    llm_base_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible provider (e.g. .../v1)."
    )
    llm_api_key: SecretStr | None = Field(
        None, description="API key of the OpenAI-compatible provider."
    )

    @model_validator(mode="after")
    def _secrets_are_real(self) -> GovernanceSettings:
        if self.require_secrets:
            for name in ("audit_key",):
                if getattr(self, name).get_secret_value() == DEVELOPMENT_SECRET:
                    raise ValueError(
                        f"GOVERNANCE_{name.upper()} must be set: require_secrets is on and the "
                        "development default is in use"
                    )
        return self

    def development_secrets(self) -> list[str]:
        """The ``GOVERNANCE_*`` secrets left at their development default (empty in production:
        ``require_secrets`` refuses them)."""
        return [
            f"GOVERNANCE_{name.upper()}"
            for name in ("audit_key",)
            if getattr(self, name).get_secret_value() == DEVELOPMENT_SECRET
        ]

    @property
    def state_url(self) -> str:
        return self.state_redis_url or self.broker_url

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def heartbeat_interval_s(self) -> float:
        return (self.heartbeat_ms or self.lease_ms // 3) / 1000

    @property
    def countdown_limit_s(self) -> float:
        """Delays up to this are broker countdowns; longer ones are parked (celery #2599)."""
        return self.max_countdown_s or self.visibility_timeout_s / 4
