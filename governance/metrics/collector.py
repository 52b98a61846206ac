"""A Prometheus collector for governance: decisions, waits, held tasks, budgets, the ledger.

Counters and histograms come from the tenants' audit chains (the record of every decision, read
incrementally from where the last scrape stopped), so workers need no metrics server of their
own and the numbers agree with the audit. Gauges (running, waiting and held tasks, the oldest
wait, budgets, overdue ledger entries) are read live from Redis on every scrape.

Label hygiene: a ``tenant`` label only ever takes the name of a tenant of the policy, or
``other`` (a name sent by any caller never becomes a label value); every metric has one unit,
named in it. Every metric is listed in :data:`METRICS` (and in the README).
"""

from __future__ import annotations

import json
import logging
import threading
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
from redis.exceptions import RedisError

from governance.policy.engine import Policy
from governance.store.audit import AuditLog
from governance.store.control import Controls
from governance.store.errors import StoreUnavailable
from governance.store.held import STATUS_ORDER, HeldStore
from governance.store.keys import DEPLOYMENT_CHAIN, Period
from governance.store.ledger import Ledger
from governance.store.limits import budget_checks
from governance.store.state import StateStore
from governance.store.usage import read_usage

log = logging.getLogger("governance.metrics")

OTHER = "other"

#: Every metric this collector serves, with its help text (the README lists the same).
METRICS = {
    "governance_up": "Whether the state Redis answered this scrape (1) or not (0: the gauges "
    "read from it are left out, the counters keep their last values).",
    "governance_decisions_total": "Authorization and admission decisions, by tenant and outcome.",
    "governance_waits_total": "Attempts that had to wait (first wait only), by tenant and limit.",
    "governance_audit_events_total": "Audit entries written, by event type.",
    "governance_republished_total": "Tasks published again by the reconciler, by tenant.",
    "governance_wait_seconds": "Time a task waited before it was admitted, by tenant.",
    "governance_admission_latency_seconds": "Admission call latency measured by the workers.",
    "governance_held_tasks": "Held tasks, by tenant and status.",
    "governance_running_tasks": "Running tasks holding a concurrency lease, by tenant.",
    "governance_waiting_tasks": "Tasks in the tenant's wait list.",
    "governance_oldest_wait_seconds": "How long the oldest task of the wait list has waited.",
    "governance_worker_seconds_last_minute": "Worker time the tenant's tasks used over the last "
    "minute (its share of the pool: divide by the sum over tenants).",
    "governance_tenant_weight": "The tenant's weight in a saturated pool (an operator's "
    "override while it lasts).",
    "governance_tenant_paused": "1 while an operator paused the tenant (govctl tenants pause).",
    "governance_ledger_overdue_tasks": "Ledger entries nobody looked at in time (should be 0).",
    "governance_budget_used_tokens": "Tokens used in the current day/month, by kind.",
    "governance_budget_limit_tokens": "Token budget of the current day/month, by kind.",
    "governance_budget_used_steps": "Steps used in the current day/month.",
    "governance_budget_limit_steps": "Step budget of the current day/month.",
    "governance_budget_used_tool_calls": "Tool calls used in the current day/month.",
    "governance_budget_limit_tool_calls": "Tool call budget of the current day/month.",
    "governance_budget_used_usd": "Cost in USD used in the current day/month.",
    "governance_budget_limit_usd": "Cost budget in USD of the current day/month.",
}

#: Audit event type -> the decision outcome it records.
DECISION_OF_EVENT = {
    "admitted": "allow",
    "authorization_denied": "deny",
    "held": "hold",
    "suggested": "suggest",
    "shadowed": "shadow",
}
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
WAIT_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
#: Budget kind -> (metric stem, unit label value) for the per-unit budget metrics.
BUDGET_METRIC = {
    "tokens": ("tokens", "total"),
    "input_tokens": ("tokens", "input"),
    "output_tokens": ("tokens", "output"),
    "steps": ("steps", ""),
    "tool_calls": ("tool_calls", ""),
    "cost": ("usd", ""),
}


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(bounds) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, seconds: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        self.counts[label][index] += 1
        self.sums[label] += seconds

    def family(self, name: str, label: str | None) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, METRICS[name], labels=[label] if label else None)
        for key, counts in sorted(self.counts.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([key] if label else [], buckets, self.sums[key])
        return family


class GovernanceCollector(Collector):
    """Collects on every scrape; safe to register once per process."""

    def __init__(self, state: StateStore, audit: AuditLog, policy: Policy) -> None:
        self._state = state
        self._audit = audit
        self._policy = policy
        self._lock = threading.Lock()
        self._cursor: dict[str, str] = {}
        self._decisions: dict[tuple[str, str], int] = defaultdict(int)
        self._waits: dict[tuple[str, str], int] = defaultdict(int)
        self._events: dict[str, int] = defaultdict(int)
        self._latency = _Histogram(LATENCY_BUCKETS_S)
        self._wait = _Histogram(WAIT_BUCKETS_S)

    def _label(self, tenant: str) -> str:
        return tenant if tenant in self._policy.tenant_names else OTHER

    def _read_audit(self, max_entries: int = 50_000) -> None:
        for chain in (*self._policy.tenant_names, DEPLOYMENT_CHAIN):
            start = self._cursor.get(chain)
            entries = self._audit.entries(chain, start=f"({start}" if start else "-")
            for read, entry in enumerate(entries):
                self._cursor[chain] = entry.id
                if not entry.is_seal:
                    self._count(chain, entry.fields)
                if read >= max_entries:
                    break

    def _count(self, chain: str, fields: dict[str, str]) -> None:
        kind = fields.get("type", "")
        tenant = self._label(chain)
        self._events[kind] += 1
        if kind in DECISION_OF_EVENT:
            self._decisions[(tenant, DECISION_OF_EVENT[kind])] += 1
        try:
            detail = json.loads(fields.get("detail") or "{}")
        except ValueError:
            detail = {}
        if kind == "waiting":
            self._waits[(tenant, str(detail.get("violation", "unknown")))] += 1
        if kind == "admitted" and "waited_ms" in detail:
            self._wait.observe(tenant, float(detail["waited_ms"]) / 1000)
        if "admit_ms" in detail:
            self._latency.observe("", float(detail["admit_ms"]) / 1000)

    def collect(self) -> Iterator[Metric]:
        """Every metric; while the state Redis does not answer, ``governance_up`` is 0 and the
        gauges read from it are left out, so a scrape still succeeds (and alerts can say why)."""
        with self._lock:
            try:
                self._read_audit()
                gauges = list(self._gauges())
            except (StoreUnavailable, RedisError, OSError) as exc:
                gauges = []
                self._note_down(exc)
            else:
                self._note_up()
            up = GaugeMetricFamily("governance_up", METRICS["governance_up"])
            up.add_metric([], 0.0 if self._down else 1.0)
            metrics = [up, *self._counters(), *gauges]
        yield from metrics

    _down = False

    def _note_down(self, exc: BaseException) -> None:
        """Log an outage once when it starts (not at every scrape)."""
        if not self._down:
            log.warning("the state Redis does not answer (%s): governance_up is 0", exc)
        self._down = True

    def _note_up(self) -> None:
        if self._down:
            log.warning("the state Redis answers again: governance_up is 1")
        self._down = False

    def _counters(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "governance_decisions",
            METRICS["governance_decisions_total"],
            labels=["tenant", "outcome"],
        )
        for (tenant, outcome), n in sorted(self._decisions.items()):
            decisions.add_metric([tenant, outcome], n)
        yield decisions
        waits = CounterMetricFamily(
            "governance_waits", METRICS["governance_waits_total"], labels=["tenant", "violation"]
        )
        for (tenant, violation), n in sorted(self._waits.items()):
            waits.add_metric([tenant, violation], n)
        yield waits
        events = CounterMetricFamily(
            "governance_audit_events", METRICS["governance_audit_events_total"], labels=["type"]
        )
        for kind, n in sorted(self._events.items()):
            events.add_metric([kind], n)
        yield events
        yield self._wait.family("governance_wait_seconds", "tenant")
        yield self._latency.family("governance_admission_latency_seconds", None)

    def _gauges(self) -> Iterator[Metric]:
        def gauge(name: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, METRICS[name], labels=list(labels))

        held = gauge("governance_held_tasks", "tenant", "status")
        running = gauge("governance_running_tasks", "tenant")
        waiting = gauge("governance_waiting_tasks", "tenant")
        oldest = gauge("governance_oldest_wait_seconds", "tenant")
        worker_time = gauge("governance_worker_seconds_last_minute", "tenant")
        weight = gauge("governance_tenant_weight", "tenant")
        paused = gauge("governance_tenant_paused", "tenant")
        controls = Controls(self._state, self._audit)
        overdue = gauge("governance_ledger_overdue_tasks", "tenant")
        republished = CounterMetricFamily(
            "governance_republished",
            METRICS["governance_republished_total"],
            labels=["tenant"],
        )
        budgets: dict[str, GaugeMetricFamily] = {}
        store = HeldStore(self._state)
        ledger = Ledger(self._state)
        grace_ms = self._state.timings.grace_ms
        for tenant in self._policy.tenant_names:
            for status in STATUS_ORDER:
                held.add_metric([tenant, status.value], store.count(tenant, status))
            status_now = ledger.status(tenant, overdue_after_ms=grace_ms)
            running.add_metric([tenant], status_now.running)
            waiting.add_metric([tenant], status_now.waiting)
            oldest.add_metric([tenant], (status_now.oldest_wait_ms or 0) / 1000)
            worker_time.add_metric([tenant], status_now.worker_ms_last_minute / 1000)
            paused.add_metric([tenant], 1.0 if status_now.paused else 0.0)
            tenant_policy = self._policy.tenant(tenant)
            override = controls.read(tenant).weight
            weight.add_metric([tenant], override or (tenant_policy.weight if tenant_policy else 1))
            overdue.add_metric([tenant], status_now.overdue)
            republished.add_metric([tenant], ledger.republished(tenant))
            self._budgets(tenant, budgets)
        yield from (held, running, waiting, oldest, worker_time, weight, paused, overdue)
        yield republished
        yield from budgets.values()

    def _budgets(self, tenant: str, families: dict[str, GaugeMetricFamily]) -> None:
        policy = self._policy.tenant(tenant)
        if policy is None:
            return
        for check in budget_checks(policy):
            if check.period is Period.RUN:
                continue  # per-run budgets have one window per run: see `govctl usage --run`
            stem, kind = BUDGET_METRIC[check.kind]
            snapshot = read_usage(self._state, tenant, check.period)
            value = _amount(snapshot.used, check.kind)
            for what, amount in (("used", value), ("limit", check.limit)):
                name = f"governance_budget_{what}_{stem}"
                labels = ["tenant", "period", "kind"] if stem == "tokens" else ["tenant", "period"]
                family = families.setdefault(
                    name, GaugeMetricFamily(name, METRICS[name], labels=labels)
                )
                values = [tenant, check.period.value] + ([kind] if stem == "tokens" else [])
                family.add_metric(values, _scaled(check.kind, amount))


def _amount(usage: Any, kind: str) -> int:
    if kind == "tokens":
        return int(usage.input_tokens + usage.output_tokens)
    if kind == "cost":
        return int(usage.cost_micro_usd)
    return int(getattr(usage, kind))


def _scaled(kind: str, value: int) -> float:
    """Cost in USD, everything else as counted."""
    return value / 1_000_000 if kind == "cost" else float(value)
