"""Deployment settings shared by workers, publishers and ``govctl``: one model, read from env.

Every field can be set with an environment variable named ``GOVERNANCE_<FIELD>`` (for example
``GOVERNANCE_BROKER_URL``), so the same settings drive a laptop demo, docker-compose and
production. Secrets are :class:`pydantic.SecretStr` so they never appear in logs or reprs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Used only when no key is configured; fine for a laptop, refused when ``require_secrets``.
DEVELOPMENT_SECRET = "development-only-secret-change-me"


class StateDurability(Enum):
    """What must be true of a task that comes to live only in the state Redis (it waits, is
    parked or held) before its broker message is acknowledged or its publisher returns."""

    #: Nothing is waited for: a crash of the state Redis may lose its last second of writes
    #: (AOF ``everysec``), a failover what the replica had not received.
    NONE = "none"
    #: ``WAITAOF 1 0``: the write is in the primary's AOF on disk (Redis 7.2+, Valkey).
    AOF = "aof"
    #: ``WAITAOF 1 0`` and ``WAIT N``: also received by N replicas (a failover keeps it).
    REPLICAS = "replicas"


class BrokerKind(Enum):
    """The brokers governance knows the hazards of."""

    REDIS = "redis"
    RABBITMQ = "rabbitmq"


_BROKER_SCHEMES = {
    "redis": BrokerKind.REDIS,
    "rediss": BrokerKind.REDIS,
    "amqp": BrokerKind.RABBITMQ,
    "amqps": BrokerKind.RABBITMQ,
    "pyamqp": BrokerKind.RABBITMQ,
}


def broker_kind(url: str) -> BrokerKind:
    """The broker a Celery broker URL names; a clear error for any other."""
    scheme = urlsplit(url).scheme.lower()
    try:
        return _BROKER_SCHEMES[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in _BROKER_SCHEMES)
        raise ValueError(
            f"unsupported broker URL scheme {scheme + '://' if scheme else repr(url)}: "
            f"use one of {known}"
        ) from None


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def sentinel_addresses(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as a list of (host, port); a clear error for anything else."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port (a Sentinel's address)")
        found.append((host.strip("[]"), int(port)))
    if text.strip() and not found:
        raise ValueError("no Sentinel address in it (host:port,host:port)")
    return found


def _checked_url(url: str, schemes: tuple[str, ...] | None = None) -> str:
    """``url`` if it has a scheme (one of ``schemes``, if given) and a numeric port (if any):
    the error names what is wrong before any client tries to parse it, without repeating the
    URL (it may hold a password)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise ValueError("not a URL: it has no scheme (like redis://host:6379/0)")
    if schemes is not None and scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unsupported URL scheme {scheme}://: use one of {known}")
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ValueError("its port is not a number") from None
    return url


class GovernanceSettings(BaseSettings):
    """Where the broker and the governance state live, the policy file, and timings."""

    model_config = SettingsConfigDict(env_prefix="GOVERNANCE_", extra="forbid")

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Celery broker that carries the tasks: Redis (redis://, rediss://) or "
        "RabbitMQ (amqp://, amqps://, pyamqp://).",
    )
    result_backend: str | None = Field(
        None,
        description="Celery result backend; defaults to the broker URL on Redis, to the state "
        "Redis on RabbitMQ.",
    )
    state_redis_url: str | None = Field(
        None,
        description="Redis holding governance state (leases, budgets, held tasks, audit); "
        "defaults to the broker URL on Redis, required on RabbitMQ.",
    )
    state_redis_cluster: bool = Field(False, description="The state Redis is a Redis Cluster.")
    state_sentinels: str | None = Field(
        None,
        description="Redis Sentinels that watch the state Redis (`host:port,host:port`): the "
        "state store connects to the primary they name, and after a failover to the replica "
        "they promoted. GOVERNANCE_STATE_REDIS_URL then gives only the database and "
        "credentials (its host and port are not used).",
    )
    state_sentinel_master: str = Field(
        "governance",
        min_length=1,
        description="The name the Sentinels know the state Redis by (`sentinel monitor NAME ...`).",
    )
    state_sentinel_password: SecretStr | None = Field(
        None, description="The Sentinels' own password, when they require one."
    )
    state_durability: StateDurability = Field(
        StateDurability.NONE,
        description="What a task that lives only in the state Redis (waiting, parked, held, "
        "waiting from publication, accepted while the broker was down) needs before its broker "
        "message is acknowledged or `apply_async` returns: `none`; `aof` (WAITAOF: in the "
        "primary's AOF on disk); `replicas` (WAITAOF and WAIT: also received by "
        "GOVERNANCE_STATE_DURABLE_REPLICAS replicas, so a failover keeps it). Redis 7.2+ or "
        "Valkey; a Redis 6.2 confirms only what it can (WAIT) and says so in the log.",
    )
    state_durable_replicas: int = Field(
        1,
        ge=1,
        description="With GOVERNANCE_STATE_DURABILITY=replicas: how many replicas must have "
        "received a task's record.",
    )
    state_durable_timeout_s: float = Field(
        10.0,
        gt=0,
        description="With GOVERNANCE_STATE_DURABILITY set: how long a publisher waits for the "
        "confirmation before it raises NotDurable (a worker keeps the message unacknowledged, "
        "and gives it back to the broker after half the broker's limit on an unacknowledged "
        "delivery).",
    )
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
    policy_check_s: float = Field(
        2.0,
        gt=0,
        description="How often each process checks the policy file for a change; a changed, "
        "valid file is enforced without a restart (an invalid one changes nothing).",
    )
    consumer_timeout_s: int = Field(
        1800,
        ge=1,
        description="RabbitMQ broker's consumer_timeout (its default: 30 min): a delivery left "
        "unacknowledged longer closes its channel (celery #6760).",
    )
    max_countdown_s: float | None = Field(
        None,
        gt=0,
        description="Longest delay kept as a broker countdown; longer waits are parked in Redis. "
        "Defaults to a quarter of the broker's limit on an unacknowledged delivery (the "
        "visibility timeout on Redis, the consumer timeout on RabbitMQ).",
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
        "store is down (never longer than half the broker's limit on an unacknowledged "
        "delivery), before it acknowledges the delivery and settles it in the background.",
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
    audit_adopt_s: float = Field(
        10.0,
        gt=0,
        description="How often the maintenance leader seals (adopts) audit entries left "
        "unsealed past the seal grace by a killed writer, and looks for a chain that ends "
        "before an entry it saw (cut back). `govctl audit verify` reports an unsealed entry once "
        "it is older than the grace plus this (or the leader lock's lapse, if longer).",
    )
    audit_anchors: str = Field(
        "audit-anchors.txt",
        min_length=1,
        description="Where the maintenance leader appends each signed checkpoint (the anchors, "
        "outside Redis), with GOVERNANCE_AUDIT_ANCHOR_KEY_FILE: a file on its host, or several "
        "separated by ':' (e.g. a path every host shares); relative paths are from the worker's "
        "directory. `govctl audit verify --anchors` reads them.",
    )
    audit_anchor_key_file: Path | None = Field(
        None,
        description="The workers' Ed25519 private key (a PEM file, as `govctl reviewers keygen` "
        "writes) that signs the anchors; without it the leader does not anchor.",
    )
    audit_anchor_public_key: str | None = Field(
        None,
        description="The anchor key's public half (`ed25519:<base64>`), with which `govctl "
        "audit verify --anchors` checks the anchors.",
    )
    held_sweep_s: float = Field(
        5.0,
        gt=0,
        description="How often the maintenance leader (one worker at a time) rejects held "
        "tasks whose hold expired.",
    )
    events_lease_s: float = Field(
        15.0,
        gt=0,
        description="How long a worker sends task events (Celery's and the governance layer's, "
        "for Flower) after the last `enable_events` a monitor sent it (Flower sends one every "
        "5 s while it runs): without a monitor, no task event is sent. Workers started with "
        "`-E` (or `worker_send_task_events=True`) always send.",
    )
    held_announce_s: float = Field(
        30.0,
        gt=0,
        description="While task events are on, how often the maintenance leader announces "
        "every held task again (a page per round), so a monitor started later lists them; "
        "also at once when events go on.",
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
    shell_best_effort: bool = Field(
        False,
        description="Run shell commands even where the worker cannot contain a call (no "
        "writable cgroup, and not root for a uid of the call's own): its processes then end "
        "with it only through a PID namespace, if the kernel allows one, else with its process "
        "group, and its process limit counts beyond what the shell user already runs. Off, "
        "shell refuses to run there.",
    )
    llm_base_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible provider (e.g. .../v1)."
    )
    llm_api_key: SecretStr | None = Field(
        None, description="API key of the OpenAI-compatible provider."
    )
    llm_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Timeout of the OpenAI-compatible provider's requests (connecting, sending, "
        "each wait for the answer). A call that times out after it was sent counts its whole "
        "reservation as spent (the provider may have billed it).",
    )

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str) -> str:
        return _checked_url(url, tuple(_BROKER_SCHEMES))

    @field_validator("state_redis_url")
    @classmethod
    def _state_redis_url(cls, url: str | None) -> str | None:
        return None if url is None else _checked_url(url, _REDIS_SCHEMES)

    @field_validator("state_sentinels")
    @classmethod
    def _state_sentinels(cls, value: str | None) -> str | None:
        if value is not None:
            sentinel_addresses(value)  # raises, naming what is wrong
        return value

    @field_validator("result_backend")
    @classmethod
    def _result_backend(cls, url: str | None) -> str | None:
        return None if url is None else _checked_url(url)

    @model_validator(mode="after")
    def _state_is_redis(self) -> GovernanceSettings:
        if (
            self.broker_kind is not BrokerKind.REDIS
            and self.state_redis_url is None
            and self.state_sentinels is None
        ):
            raise ValueError(
                f"GOVERNANCE_STATE_REDIS_URL must be set: the broker ({self.broker_kind.value}) "
                "is not Redis, and the governance state lives in Redis"
            )
        if self.state_sentinels is not None and self.state_redis_cluster:
            raise ValueError(
                "GOVERNANCE_STATE_SENTINELS and GOVERNANCE_STATE_REDIS_CLUSTER exclude each "
                "other: a Redis Cluster fails over by itself"
            )
        return self

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
    def broker_kind(self) -> BrokerKind:
        """Which broker ``broker_url`` names, from its scheme."""
        return broker_kind(self.broker_url)

    @property
    def state_url(self) -> str:
        """The state Redis's URL (with Sentinels: its database and credentials only)."""
        if self.state_redis_url is None and self.state_sentinels is not None:
            return "redis://"
        return self.state_redis_url or self.broker_url

    @property
    def durability_round_ms(self) -> int:
        """How long one durability confirmation waits for its fsync and replicas: a second,
        shorter than the state Redis's timeout."""
        return max(50, min(1000, round(self.state_timeout_s * 500)))

    def state_connection(self) -> dict[str, Any]:
        """The keyword arguments of ``store.connection.connect`` besides the URL."""
        password = self.state_sentinel_password
        return {
            "cluster": self.state_redis_cluster,
            "timeout_s": self.state_timeout_s,
            "sentinels": sentinel_addresses(self.state_sentinels or ""),
            "sentinel_master": self.state_sentinel_master,
            "sentinel_password": password.get_secret_value() if password else None,
        }

    @property
    def backend_url(self) -> str:
        if self.result_backend:
            return self.result_backend
        return self.broker_url if self.broker_kind is BrokerKind.REDIS else self.state_url

    @property
    def unacked_limit_s(self) -> float:
        """How long the broker lets a delivery stay unacknowledged before it takes it back."""
        if self.broker_kind is BrokerKind.RABBITMQ:
            return float(self.consumer_timeout_s)
        return float(self.visibility_timeout_s)

    @property
    def heartbeat_interval_s(self) -> float:
        return (self.heartbeat_ms or self.lease_ms // 3) / 1000

    @property
    def countdown_limit_s(self) -> float:
        """Delays up to this are broker countdowns; longer ones are parked (celery #2599)."""
        return self.max_countdown_s or self.unacked_limit_s / 4
