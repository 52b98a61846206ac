"""Start a private Redis Cluster (N masters, no replicas) on loopback ports.

Scripts and multi-key operations must keep their keys in one hash slot to work on a cluster;
a real local cluster lets the tests prove that, instead of assuming it.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from typing import Self

import redis
from redis.cluster import ClusterNode

from governance.embedded.processes import StartedByWith
from governance.embedded.redis_server import (
    LOOPBACK,
    EmbeddedRedis,
    RedisBinaries,
    RedisStartError,
    _control_client,
    find_redis_binaries,
)

__all__ = ["CLUSTER_SLOTS", "EmbeddedRedisCluster"]

CLUSTER_SLOTS = 16384
_MIN_MASTERS = 3  # `redis-cli --cluster create` refuses fewer
_POLL_INTERVAL_S = 0.05
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _parse_cluster_info(raw: object) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of strings, whatever shape redis-py handed back."""
    if isinstance(raw, dict):
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (
                v.decode() if isinstance(v, bytes) else str(v)
            )
            for k, v in raw.items()
        }
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            info[key] = value
    return info


class EmbeddedRedisCluster(StartedByWith):
    """``masters`` private ``redis-server`` processes joined into one Redis Cluster.

    Every node has its own temporary data directory; ``stop()`` stops them all.
    """

    def __init__(
        self,
        masters: int = 3,
        startup_timeout_s: float = 30.0,
        binaries: RedisBinaries | None = None,
        appendonly: bool = False,
    ) -> None:
        if masters < _MIN_MASTERS:
            raise ValueError(f"a Redis Cluster needs at least {_MIN_MASTERS} masters")
        self._masters = masters
        self._binaries = binaries
        self._appendonly = appendonly
        self._startup_timeout_s = startup_timeout_s
        self._nodes: list[EmbeddedRedis] = []
        self._lock = threading.RLock()
        self._create_output = ""

    # ----------------------------------------------------------------- properties

    @property
    def masters(self) -> int:
        return self._masters

    @property
    def servers(self) -> list[EmbeddedRedis]:
        return list(self._nodes)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        if not self._nodes:
            raise RuntimeError("EmbeddedRedisCluster has not been started")
        return self._nodes[0].url

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(host, port) for host, port in self.nodes]  # type: ignore[no-untyped-call]

    @property
    def is_running(self) -> bool:
        return bool(self._nodes) and all(node.is_running for node in self._nodes)

    @property
    def binaries(self) -> RedisBinaries:
        """The server binary its nodes run."""
        return self._binaries or find_redis_binaries()

    @property
    def create_output(self) -> str:
        """What ``redis-cli --cluster create`` printed."""
        return self._create_output

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the nodes, create the cluster, and wait until every node reports it ok."""
        with self._lock:
            if self._nodes:
                return self
            deadline = time.monotonic() + self._startup_timeout_s
            try:
                binaries = self._binaries or find_redis_binaries()
                for _ in range(self._masters):
                    node = EmbeddedRedis(
                        binaries=binaries,
                        appendonly=self._appendonly,
                        extra_args=(
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            "5000",
                        ),
                        startup_timeout_s=max(1.0, deadline - time.monotonic()),
                    )
                    self._nodes.append(node)
                    node.start()
                self._create(str(binaries.cli), deadline)
                self._wait_cluster_ok(deadline)
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        with self._lock:
            nodes, self._nodes = self._nodes, []
            for node in nodes:
                node.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedRedisCluster nodes={self.nodes}>"

    # ------------------------------------------------------------------ internals

    def _create(self, cli: str, deadline: float) -> None:
        command = [
            cli,
            "--cluster",
            "create",
            *(f"{host}:{port}" for host, port in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        timeout = max(1.0, deadline - time.monotonic())
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = _decode(exc.stdout) + _decode(exc.stderr)
            raise RedisStartError(
                f"`{' '.join(command)}` did not finish within {timeout:.1f}s:\n{output}"
            ) from exc
        self._create_output = _decode(result.stdout) + _decode(result.stderr)
        if result.returncode != 0 or "[ERR]" in self._create_output:
            raise RedisStartError(
                f"`{' '.join(command)}` failed (exit code {result.returncode}):\n"
                f"{self._create_output}"
            )

    def _wait_cluster_ok(self, deadline: float) -> None:
        clients = [_control_client(node.port) for node in self._nodes]
        states: dict[int, dict[str, str]] = {}
        try:
            while True:
                for node, client in zip(self._nodes, clients, strict=True):
                    try:
                        states[node.port] = _parse_cluster_info(client.cluster("INFO"))
                    except (redis.RedisError, OSError) as exc:
                        states[node.port] = {"error": str(exc)}
                if all(self._node_ok(state) for state in states.values()):
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_INTERVAL_S)
        finally:
            for client in clients:
                client.close()
        summary = "\n".join(
            f"  {LOOPBACK}:{port}: "
            + ", ".join(
                f"{key}={state.get(key, '?')}"
                for key in ("cluster_state", "cluster_slots_assigned", "cluster_known_nodes")
            )
            + (f", error={state['error']}" if "error" in state else "")
            for port, state in states.items()
        )
        raise RedisStartError(
            f"cluster did not reach cluster_state:ok on every node within "
            f"{self._startup_timeout_s:.1f}s:\n{summary}\n"
            f"redis-cli output:\n{self._create_output}"
        )

    def _node_ok(self, state: dict[str, str]) -> bool:
        return (
            state.get("cluster_state") == "ok"
            and state.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and state.get("cluster_known_nodes") == str(self._masters)
        )


def _decode(data: bytes | str | None) -> str:
    """Process output as text, without the colour codes redis-cli adds."""
    if data is None:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return _ANSI_ESCAPE.sub("", text)
