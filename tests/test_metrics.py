"""The Prometheus exporter, as a real process scraped over HTTP and parsed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from governance.metrics.collector import METRICS
from governance.policy.actions import LLMCall, Message
from governance.policy.context import ActionContext
from governance.policy.engine import Policy
from governance.policy.usage import Usage
from governance.store import (
    AdmissionLimits,
    Admitter,
    AuditEvent,
    AuditEventType,
    AuditLog,
    AuditSealer,
)
from governance.store.control import Controls
from governance.store.held import HeldStatus, HeldStore, HeldTask
from governance.store.state import StateStore

AUDIT_KEY = "metrics-test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _exporter(state_url: str) -> Iterator[str]:
    """``python -m governance.metrics`` on a free port, reading ``state_url``; its URL."""
    port = _free_port()
    env = {
        **os.environ,
        "GOVERNANCE_STATE_REDIS_URL": state_url,
        "GOVERNANCE_BROKER_URL": state_url,
        "GOVERNANCE_CONFIG_PATH": "config/governance.yaml",
        "GOVERNANCE_AUDIT_KEY": AUDIT_KEY,
        "GOVERNANCE_STATE_TIMEOUT_S": "0.5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "governance.metrics", "--port", str(port), "--address", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=5)
            break
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the exporter never answered"
            time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout:
            process.stdout.close()


@pytest.fixture
def exporter(redis_url: str, redis_client: redis.Redis) -> Iterator[str]:
    with _exporter(redis_url) as url:
        yield url


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _held(task_id: str) -> HeldTask:
    return HeldTask(
        task_id=task_id,
        tenant="acme",
        agent="a",
        run="r",
        user="u",
        task_name="tools.shell",
        args=[],
        kwargs={"command": ["ls"]},
        context={},
        action={},
        action_name="shell",
        action_class="process.exec",
        tier="act_with_approval",
        reason="needs approval",
        call="h",
        requested_ms=1,
        expires_ms=2**40,
        envelope={},
    )


def test_metrics_are_scraped_and_parsed(exporter: str, redis_client: redis.Redis) -> None:
    state = StateStore(redis_client)
    audit = AuditLog(state, AuditSealer(AUDIT_KEY.encode()))
    base = {"tenant": "acme", "agent": "a", "run": "r"}
    audit.append(
        AuditEvent(type=AuditEventType.ADMITTED, detail={"waited_ms": 800}, **base),
        AuditEvent(type=AuditEventType.TASK_FINISHED, detail={"admit_ms": 0.8}, **base),
        AuditEvent(type=AuditEventType.TASK_FINISHED, detail={"admit_ms": 3.0}, **base),
        AuditEvent(type=AuditEventType.AUTHORIZATION_DENIED, **base),
        AuditEvent(type=AuditEventType.WAITING, detail={"violation": "rate_limit"}, **base),
        # A tenant name nobody configured, sent by whoever published: recorded in the
        # deployment's chain (as the runtime does), never a key nor a label value.
        AuditEvent(type=AuditEventType.AUTHORIZATION_DENIED, detail={"tenant": "intruder-1234"}),
    )
    store = HeldStore(state)
    store.put(_held("h1"), audit={"tenant": "acme"})
    store.put(_held("h2"), audit={"tenant": "acme"})
    policy = Policy.from_file("config/governance.yaml")
    tenant = policy.tenant("acme")
    assert tenant is not None
    call = LLMCall(
        provider="fake",
        model="fake-small",
        messages=[Message(role="user", content="hi")],
        max_tokens=100,
    )
    admitter = Admitter(state)
    limits = AdmissionLimits.for_action(tenant, call)
    ctx = ActionContext(tenant="acme", agent="a", run="r")
    done = admitter.admit(
        ctx=ctx,
        action=call,
        task_id="t1",
        attempt=0,
        estimate=Usage(steps=1, output_tokens=100),
        limits=limits,
    )
    admitter.settle(done.ticket, Usage(steps=1, input_tokens=5, output_tokens=40), run_ms=1500)
    running = admitter.admit(
        ctx=ctx,
        action=call,
        task_id="t2",
        attempt=0,
        estimate=Usage(steps=1, output_tokens=100),
        limits=limits,
    )
    assert running.admitted
    controls = Controls(state, audit)
    controls.pause("beta", AuditEvent(type=AuditEventType.TENANT_PAUSED, tenant="beta"))
    controls.override(
        "acme",
        until_ms=int(time.time() * 1000) + 60_000,
        concurrency=None,
        weight=3.0,
        queues=["celery"],
        event=AuditEvent(type=AuditEventType.LIMITS_OVERRIDDEN, tenant="acme"),
    )

    m = _scrape(exporter)
    assert m[("governance_up", ())] == 1
    assert m[("governance_decisions_total", (("outcome", "allow"), ("tenant", "acme")))] == 3
    assert m[("governance_decisions_total", (("outcome", "deny"), ("tenant", "acme")))] == 1
    assert m[("governance_decisions_total", (("outcome", "hold"), ("tenant", "acme")))] == 2
    assert m[("governance_decisions_total", (("outcome", "deny"), ("tenant", "other")))] == 1
    assert m[("governance_waits_total", (("tenant", "acme"), ("violation", "rate_limit")))] == 1
    assert m[("governance_held_tasks", (("status", "held"), ("tenant", "acme")))] == 2
    assert m[("governance_held_tasks", (("status", "released"), ("tenant", "acme")))] == 0
    assert m[("governance_running_tasks", (("tenant", "acme"),))] == 1
    assert m[("governance_waiting_tasks", (("tenant", "acme"),))] == 0
    assert m[("governance_tenant_paused", (("tenant", "beta"),))] == 1
    assert m[("governance_tenant_paused", (("tenant", "acme"),))] == 0
    assert m[("governance_tenant_weight", (("tenant", "acme"),))] == 3.0  # the override
    assert m[("governance_tenant_weight", (("tenant", "beta"),))] == 1.0  # the policy's
    assert m[("governance_worker_seconds_last_minute", (("tenant", "acme"),))] == 1.5  # t1
    assert m[("governance_worker_seconds_last_minute", (("tenant", "beta"),))] == 0
    day_tokens = (("kind", "total"), ("period", "day"), ("tenant", "acme"))
    assert m[("governance_budget_used_tokens", day_tokens)] == 45
    assert m[("governance_budget_limit_tokens", day_tokens)] == 100_000
    assert m[("governance_budget_limit_usd", (("period", "day"), ("tenant", "acme")))] == 5.0
    assert m[("governance_admission_latency_seconds_count", ())] == 2
    assert m[("governance_admission_latency_seconds_bucket", (("le", "0.001"),))] == 1
    assert m[("governance_admission_latency_seconds_bucket", (("le", "0.005"),))] == 2
    assert m[("governance_wait_seconds_count", (("tenant", "acme"),))] == 1

    # Label hygiene: only the policy's tenants and "other"; one unit per metric (its name).
    tenants = {dict(labels).get("tenant") for _, labels in m} - {None}
    assert tenants <= {*policy.tenant_names, "other"}
    assert "intruder" not in httpx.get(exporter, timeout=5).text
    documented = set(METRICS)
    served = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name, _ in m
    }
    served = {n if n in documented else n + "_total" for n in served}
    assert served <= documented, served - documented

    # Counters keep counting from where the previous scrape stopped.
    audit.append(AuditEvent(type=AuditEventType.HELD, **base))
    again = _scrape(exporter)
    assert again[("governance_decisions_total", (("outcome", "hold"), ("tenant", "acme")))] == 3
    assert again[("governance_decisions_total", (("outcome", "allow"), ("tenant", "acme")))] == 3
    assert store.count("acme", HeldStatus.HELD) == 2


def test_an_outage_of_the_state_redis_is_a_gauge_not_an_error() -> None:
    """The state Redis does not answer: every scrape still answers 200, with ``governance_up``
    0 (an exporter keeps answering, so an alert can say why), and no gauge read from it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = int(sock.getsockname()[1])  # nothing listens there once the socket is closed
    with _exporter(f"redis://127.0.0.1:{closed}/1") as url:
        for _ in range(3):
            response = httpx.get(url, timeout=10)
            assert response.status_code == 200, response.text
            families = {f.name: f for f in text_string_to_metric_families(response.text)}
            assert [s.value for s in families["governance_up"].samples] == [0]
            assert "governance_held_tasks" not in families
            assert "governance_decisions" in families  # the counters, as far as they got
