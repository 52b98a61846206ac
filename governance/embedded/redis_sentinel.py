"""A private, replicated Redis watched by Sentinels: a primary with AOF, its replicas, and the
Sentinels that promote a replica when the primary dies (the same server binary, in sentinel
mode).

The failover tests need a real one: a replica that falls behind, a primary killed, a replica
promoted, clients that follow it through the Sentinels.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import redis

from governance.embedded.processes import StartedByWith
from governance.embedded.redis_server import (
    _LOG_FILE,
    LOOPBACK,
    EmbeddedRedis,
    RedisBinaries,
    RedisStartError,
    _control_client,
    find_redis_binaries,
)

__all__ = ["EmbeddedSentinel", "EmbeddedSentinelGroup"]

_POLL_INTERVAL_S = 0.05
#: Every server of a group (any of them may become the primary).
_NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")


class EmbeddedSentinel(EmbeddedRedis):
    """One Sentinel process watching the primary ``master_name`` at ``master_port``."""

    def __init__(
        self,
        *,
        master_name: str,
        master_port: int,
        quorum: int,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        binaries: RedisBinaries | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(binaries=binaries, startup_timeout_s=startup_timeout_s)
        self.master_name = master_name
        self._monitor = (
            f"sentinel monitor {master_name} {LOOPBACK} {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )

    def _command(self, port: int, data_dir: Path) -> list[str]:
        config = data_dir / "sentinel.conf"
        if not config.exists():  # Sentinel rewrites it with what it learns: kept on restart
            config.write_text(self._monitor)
        return [
            str(self.binaries.server),
            str(config),
            "--sentinel",
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(data_dir),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(data_dir / _LOG_FILE),
        ]

    def master_address(self) -> tuple[str, int] | None:
        """Where this Sentinel says the primary is now (None if it cannot say)."""
        client = _control_client(self.port)
        try:
            found = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
            )
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()
        if not found:
            return None
        host, port = found
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)


class EmbeddedSentinelGroup(StartedByWith):
    """A primary (AOF on), ``replicas`` replicas of it and ``sentinels`` Sentinels (quorum: a
    majority), all private processes of one server binary on loopback ports.

    ``start()`` returns once the replicas are in sync and every Sentinel knows the replicas
    and the other Sentinels (so a failover can happen); ``stop()`` stops every process.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master_name: str = "governance",
        binaries: RedisBinaries | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if replicas < 1 or sentinels < 1:
            raise ValueError("a Sentinel group needs at least one replica and one Sentinel")
        self.master_name = master_name
        self._replicas = replicas
        self._sentinels = sentinels
        self._binaries = binaries
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._startup_timeout_s = startup_timeout_s
        self.servers: list[EmbeddedRedis] = []
        self.sentinels: list[EmbeddedSentinel] = []
        self._lock = threading.RLock()

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, s.port) for s in self.sentinels]

    @property
    def sentinels_setting(self) -> str:
        """The Sentinels as ``GOVERNANCE_STATE_SENTINELS`` takes them: ``host:port,...``."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)

    def server_at(self, port: int) -> EmbeddedRedis:
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no server of this group on port {port}")

    def master_address(self) -> tuple[str, int] | None:
        """Where the first Sentinel that answers says the primary is now."""
        for sentinel in self.sentinels:
            if sentinel.is_running:
                found = sentinel.master_address()
                if found is not None:
                    return found
        return None

    @property
    def primary(self) -> EmbeddedRedis:
        """The server the Sentinels name as the primary now."""
        found = self.master_address()
        if found is None:
            raise RuntimeError("no Sentinel names a primary")
        return self.server_at(found[1])

    def start(self) -> Self:
        with self._lock:
            if self.servers:
                return self
            deadline = time.monotonic() + self._startup_timeout_s
            binaries = self._binaries or find_redis_binaries()
            try:
                # A replica syncs at once (a diskless sync waits 5 s for more by default).
                primary = EmbeddedRedis(
                    appendonly=True, binaries=binaries, extra_args=_NO_SYNC_DELAY
                )
                self.servers.append(primary)
                primary.start()
                for _ in range(self._replicas):
                    replica = EmbeddedRedis(
                        appendonly=True,
                        binaries=binaries,
                        extra_args=(
                            *_NO_SYNC_DELAY,
                            "--replicaof",
                            LOOPBACK,
                            str(primary.port),
                        ),
                    )
                    self.servers.append(replica)
                    replica.start()
                self._wait(deadline, "the replicas to sync with the primary", self._in_sync)
                for _ in range(self._sentinels):
                    sentinel = EmbeddedSentinel(
                        master_name=self.master_name,
                        master_port=primary.port,
                        quorum=self._sentinels // 2 + 1,
                        down_after_ms=self._down_after_ms,
                        failover_timeout_ms=self._failover_timeout_ms,
                        binaries=binaries,
                    )
                    self.sentinels.append(sentinel)
                    sentinel.start()
                self._wait(deadline, "the Sentinels to know the group", self._watched)
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        with self._lock:
            for process in [*self.sentinels, *reversed(self.servers)]:
                process.stop()
            self.sentinels, self.servers = [], []

    def __repr__(self) -> str:
        ports = [s._port for s in self.servers]
        return f"<EmbeddedSentinelGroup {self.master_name} servers={ports}>"

    # ------------------------------------------------------------------ internals

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while not ready():
            if time.monotonic() >= deadline:
                raise RedisStartError(
                    f"timed out after {self._startup_timeout_s:.0f}s waiting for {what}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _in_sync(self) -> bool:
        for replica in self.servers[1:]:
            client = _control_client(replica.port)
            try:
                if client.info("replication").get("master_link_status") != "up":
                    return False
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
        return True

    def _watched(self) -> bool:
        for sentinel in self.sentinels:
            client = _control_client(sentinel.port)
            try:
                reply = client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "MASTER", self.master_name
                )
                master = _pairs(reply)
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
            if int(master.get("num-slaves", 0)) < self._replicas:
                return False
            if int(master.get("num-other-sentinels", 0)) < self._sentinels - 1:
                return False
        return True


def _pairs(reply: object) -> dict[str, str]:
    """A Sentinel reply of alternating names and values (or a dict) as a dict of strings."""
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        flat = list(reply)  # type: ignore[call-overload]
        items = list(zip(flat[::2], flat[1::2], strict=True))
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in items
    }
