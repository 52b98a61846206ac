"""A Prometheus collector for governance: decisions, deferrals, held tasks, budgets, leases.

Counters and the admission latency histogram are derived from the audit stream (the record of
every decision, read incrementally from where the last scrape stopped), so workers need no
metrics server of their own and the numbers agree with the audit. Gauges (held tasks, budget
used and limit, leases in use) are read live from Redis on every scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from governance.policy.engine import Policy
from governance.store.audit import AuditLog
from governance.store.held import STATUS_ORDER, HeldStore
from governance.store.keys import DeploymentKeys, Period, TenantKeys
from governance.store.limits import budget_checks
from governance.store.state import StateStore
from governance.store.usage import read_usage

#: Audit event type -> the decision outcome it records.
DECISION_OF_EVENT = {
    "admitted": "allow",
    "authorization_denied": "deny",
    "held": "hold",
    "suggested": "suggest",
    "shadowed": "shadow",
}
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GovernanceCollector(Collector):
    """Collects on every scrape; safe to register once per process."""

    def __init__(self, state: StateStore, audit: AuditLog, policy: Policy) -> None:
        self._state = state
        self._audit = audit
        self._policy = policy
        self._lock = threading.Lock()
        self._last_id = "-"
        self._decisions: dict[tuple[str, str], int] = defaultdict(int)
        self._deferrals: dict[tuple[str, str], int] = defaultdict(int)
        self._events: dict[str, int] = defaultdict(int)
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum = 0.0

    def _read_audit(self, max_entries: int = 50_000) -> None:
        client = self._state.client
        read = 0
        while read < max_entries:
            start = self._last_id if self._last_id == "-" else f"({self._last_id}"
            page = client.xrange(DeploymentKeys.audit_stream, min=start, max="+", count=1000)
            if not page:
                return
            for raw_id, raw in page:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                self._count(fields)
                self._last_id = _text(raw_id)
            read += len(page)

    def _count(self, fields: dict[str, str]) -> None:
        kind = fields.get("type", "")
        tenant = fields.get("tenant", "")
        self._events[kind] += 1
        if kind in DECISION_OF_EVENT:
            self._decisions[(tenant, DECISION_OF_EVENT[kind])] += 1
        detail = json.loads(fields.get("detail") or "{}")
        if kind == "deferred":
            self._deferrals[(tenant, str(detail.get("violation", "unknown")))] += 1
        if kind == "admitted" and "admit_ms" in detail:
            seconds = float(detail["admit_ms"]) / 1000
            self._latency_sum += seconds
            index = next(
                (i for i, bound in enumerate(LATENCY_BUCKETS_S) if seconds <= bound),
                len(LATENCY_BUCKETS_S),
            )
            self._buckets[index] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._read_audit()
            yield from self._counters()
            yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "governance_decisions", "Decisions by tenant and outcome.", labels=["tenant", "outcome"]
        )
        for (tenant, outcome), n in sorted(self._decisions.items()):
            decisions.add_metric([tenant, outcome], n)
        yield decisions
        deferrals = CounterMetricFamily(
            "governance_deferrals",
            "Deferrals by tenant and violation.",
            labels=["tenant", "violation"],
        )
        for (tenant, violation), n in sorted(self._deferrals.items()):
            deferrals.add_metric([tenant, violation], n)
        yield deferrals
        events = CounterMetricFamily(
            "governance_audit_events", "Audit entries by event type.", labels=["type"]
        )
        for kind, n in sorted(self._events.items()):
            events.add_metric([kind], n)
        yield events
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), self._buckets, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "governance_admission_latency_seconds",
            "Admission latency (one Lua call), as measured by the workers.",
            buckets=buckets,
            sum_value=self._latency_sum,
        )

    def _gauges(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "governance_held_tasks", "Held tasks by tenant and status.", labels=["tenant", "status"]
        )
        leases = GaugeMetricFamily(
            "governance_leases_in_use",
            "Running tasks holding a lease, by tenant.",
            labels=["tenant"],
        )
        used = GaugeMetricFamily(
            "governance_budget_used",
            "Budget used in the current window.",
            labels=["tenant", "period", "kind"],
        )
        limit = GaugeMetricFamily(
            "governance_budget_limit",
            "Budget limit of the window.",
            labels=["tenant", "period", "kind"],
        )
        store = HeldStore(self._state)
        now_ms = int(time.time() * 1000)
        for tenant in store.tenants(self._policy.tenant_names):
            for status in STATUS_ORDER:
                held.add_metric([tenant, status.value], store.count(tenant, status))
            leases.add_metric(
                [tenant], self._state.client.zcount(TenantKeys(tenant).leases, now_ms, "+inf")
            )
            self._budgets(tenant, used, limit)
        yield held
        yield leases
        yield used
        yield limit

    def _budgets(self, tenant: str, used: GaugeMetricFamily, limit: GaugeMetricFamily) -> None:
        policy = self._policy.tenant(tenant)
        if policy is None:
            return
        for check in budget_checks(policy):
            if check.period is Period.RUN:
                continue  # per-run budgets have one window per run: see `govctl usage --run`
            snapshot = read_usage(self._state, tenant, check.period)
            value = _amount(snapshot.used, check.kind)
            used.add_metric([tenant, check.period.value, check.kind], _scaled(check.kind, value))
            limit.add_metric(
                [tenant, check.period.value, check.kind], _scaled(check.kind, check.limit)
            )


def _amount(usage: Any, kind: str) -> int:
    if kind == "tokens":
        return int(usage.input_tokens + usage.output_tokens)
    if kind == "cost":
        return int(usage.cost_micro_usd)
    return int(getattr(usage, kind))


def _scaled(kind: str, value: int) -> float:
    """Cost in USD, everything else as counted."""
    return value / 1_000_000 if kind == "cost" else float(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
