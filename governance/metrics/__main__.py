"""Serve governance metrics for Prometheus: ``python -m governance.metrics --port 9108``.

Reads the same ``GOVERNANCE_*`` settings as the workers (state Redis, policy file, audit key).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from governance.integration.runtime import GovernanceRuntime
from governance.metrics.collector import GovernanceCollector
from governance.policy.engine import Policy
from governance.policy.loader import ConfigError
from governance.settings import GovernanceSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve governance metrics for Prometheus.")
    parser.add_argument("--port", type=int, default=9108, help="port to listen on (9108)")
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to bind (127.0.0.1: usage per tenant is not public; bind 0.0.0.0 behind a "
        "firewall or in a container network)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    settings = GovernanceSettings()
    try:
        policy = Policy.from_file(settings.config_path)
    except ConfigError as exc:
        parser.exit(5, f"refusing to start: the governance policy is invalid:\n{exc}\n")
    runtime = GovernanceRuntime(settings, policy)
    registry = CollectorRegistry()
    registry.register(GovernanceCollector(runtime.state, runtime.audit_log, policy))
    server, thread = start_http_server(args.port, addr=args.address, registry=registry)
    print(f"governance metrics on http://{args.address}:{args.port}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
