"""Admission, lease renewal and settlement of governed tasks: one Lua call each.

``admit`` decides one delivery of a task from its ledger record and the tenant's limits: admitted
(lease and reservation taken), waiting (at the tail of the tenant's wait list), booked (a future
rate turn taken for it), rejected, or dropped (a copy of a message that already ran, runs, waits
or was handed on). ``settle`` releases the lease, replaces the reservation with actual usage,
moves the record on, and hands freed capacity to the oldest waiting tasks. Both write their
audit entries in the same call and return the messages the caller must publish (hand-offs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any, Required, TypedDict, Unpack

from pydantic_core import to_json

from governance.policy.actions import Action, LLMCall
from governance.policy.context import ActionContext
from governance.policy.limits import (
    LimitWarning,
    NearLimit,
    Violation,
    ViolationType,
    check_limit,
)
from governance.policy.usage import Usage
from governance.store.audit import AuditEventType
from governance.store.audit_seal import AuditSealer, begin_sealed_call
from governance.store.direct import Args, Packed
from governance.store.keys import ProviderKeys, TenantKeys
from governance.store.limits import AdmissionLimits, BudgetCheck
from governance.store.pending import Pending
from governance.store.state import StateStore
from governance.store.vocabulary import (
    ADMISSION_TASK_PART,
    PROVIDER_GATE,
    RENEW,
    SETTLEMENT_LIMITS_PART,
    SETTLEMENT_TASK_PART,
    limit_values,
    template_values,
)


class AdmissionStatus(StrEnum):
    """What admission decided for one delivery."""

    ADMITTED = "admitted"
    #: Over a capacity limit (concurrency, budget held by tasks in flight): in the wait list.
    WAITING = "waiting"
    #: Over a rate limit or in a cooldown: its turn is booked; publish it again for that time.
    BOOKED = "booked"
    #: Over a limit that waiting does not fix (budget exhausted, loop, depth, waited too long).
    REJECTED = "rejected"
    #: This attempt already ran and settled: its body must not run again.
    SETTLED = "settled"
    #: Another delivery of this attempt runs, waits or was handed on: this copy is dropped.
    DUPLICATE = "duplicate"
    #: A message of an earlier attempt (a later one exists): dropped.
    STALE = "stale"
    #: A booked task arriving before its turn (a copy): dropped, its turn's message will come.
    EARLY = "early"
    #: Its run's cost reached the cost alert: the caller holds it for the reviewers.
    COST_ALERT = "alert"
    #: At publication: it may run now; a slot is kept for its message (``token``).
    HANDED = "handed"
    #: At publication: its delivery decides (a turn to book, a limit that rejects, an alert).
    SEND = "send"

    @property
    def dropped(self) -> bool:
        """This delivery is acknowledged and nothing else happens to it."""
        return self in (self.SETTLED, self.DUPLICATE, self.STALE, self.EARLY)


@dataclass(frozen=True)
class AdmissionTicket:
    """What settlement and renewal need to find the task's lease and reservations again."""

    tenant: str
    task_id: str
    attempt: int
    holder: str
    windows: tuple[str, ...]
    checks: tuple[BudgetCheck, ...]
    warning_threshold_pct: int
    #: The audit fields of the task (tenant, agent, run, action, tier, policy version).
    template: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    #: The run and how long it stays in flight after this step, when the tenant limits runs in
    #: flight (the settlement counts from its end).
    run_in_flight: tuple[str, int] | None = None

    @property
    def template_args(self) -> Packed:
        """The audit template as the scripts take it, packed once for the attempt's admission
        and its settlement."""
        # Kept by hand: functools.cached_property takes a lock per first read, on the hot path.
        packed: Packed | None = self.__dict__.get("_template_args")
        if packed is None:
            packed = Packed(template_values(self.template))
            object.__setattr__(self, "_template_args", packed)
        return packed

    @classmethod
    def of(
        cls,
        ctx: ActionContext,
        task_id: str,
        attempt: int,
        holder: str,
        limits: AdmissionLimits,
        template: Mapping[str, str],
        windows: Sequence[str] | None = None,
    ) -> AdmissionTicket:
        """The ticket of one attempt of a task of ``ctx`` under ``limits``."""
        return cls(
            tenant=ctx.tenant,
            task_id=task_id,
            attempt=attempt,
            holder=holder,
            windows=tuple(windows or TenantKeys(ctx.tenant).windows(ctx.run)),
            checks=limits.budget_checks,
            warning_threshold_pct=limits.warning_threshold_pct,
            template=template,
            run_in_flight=(
                (ctx.run, limits.run_idle_ms) if limits.run_concurrency is not None else None
            ),
        )


@dataclass(frozen=True)
class Publication:
    """A task the caller must publish: handed on from the wait list (with its token), or
    published again by the reconciler (``again``)."""

    task_id: str
    envelope: Mapping[str, Any]
    handoff: str | None = None
    again: bool = False


@dataclass(frozen=True)
class Admission:
    """The outcome of one admission call."""

    status: AdmissionStatus
    ticket: AdmissionTicket
    violation: Violation | None = None
    reason: str = ""
    wait_ms: int = 0
    turn_ms: int = 0
    parked: bool = False
    first_wait: bool = False
    ahead: int = 0
    lease_expiry_ms: int = 0
    publish: tuple[Publication, ...] = ()
    check_values: tuple[float, ...] = ()
    limits: AdmissionLimits | None = None
    #: SETTLED: the attempt was the task's last, and the task is done (``reason``: why it was
    #: rejected, when it was).
    final: bool = False
    #: SETTLED: a later attempt no settlement scheduled (its attempt number raised by a copy,
    #: or no record of the task): it never runs.
    replayed: bool = False
    #: HANDED: the token its message carries, to take the slot kept for it.
    token: str = ""
    #: How long the message waited in the broker before this delivery received it (ms), when
    #: it came straight from a publisher: a long wait means the worker pool is backlogged.
    queued_ms: int | None = None

    @property
    def admitted(self) -> bool:
        """True when the task may run now."""
        return self.status is AdmissionStatus.ADMITTED

    @property
    def warnings(self) -> tuple[LimitWarning, ...]:
        """Budgets at or above their warning threshold with this task's estimate (admitted
        tasks only; computed when asked, the hot path does not)."""
        if self.status is not AdmissionStatus.ADMITTED or self.limits is None:
            return ()
        limits = self.limits
        return tuple(
            w
            for check, value in zip(limits.budget_checks, self.check_values, strict=False)
            if (w := _warning(check, value, limits.warning_threshold_pct)) is not None
        )


@dataclass(frozen=True)
class NextAttempt:
    """A retry, recorded by the settlement of the failed attempt: its message and due time."""

    envelope_json: str
    due_ms: int
    parked: bool


@dataclass(frozen=True)
class Settlement:
    """The outcome of one settlement: whether it counted, and thresholds crossed by it.

    ``late`` means this holder had lost its lease to another delivery of the same attempt: its
    usage was counted, the other delivery's lease and reservation were left alone.
    """

    settled: bool
    late: bool = False
    warnings: tuple[LimitWarning, ...] = field(default=())
    publish: tuple[Publication, ...] = ()
    #: The grant of a task fair dispatch handed on: given back to its pool.
    pool_grant: str = ""
    #: Tasks of the tenant still waiting.
    waiting: int = 0


def _micro_to_usd(value: float) -> float:
    return value / 1_000_000


def _violation(check: BudgetCheck, current: float, limit: float) -> Violation:
    if check.kind == "cost":
        return Violation(check.violation_type, _micro_to_usd(current), _micro_to_usd(limit))
    return Violation(check.violation_type, int(current), int(limit))


def _warning(check: BudgetCheck, current: float, threshold_pct: int) -> LimitWarning | None:
    scale = _micro_to_usd if check.kind == "cost" else float
    result = check_limit(
        check.violation_type,
        scale(current),
        scale(check.limit),
        warning_threshold_pct=threshold_pct,
    )
    return result.warning if isinstance(result, NearLimit) else None


def _percent(value: float, limit: int) -> float:
    return float("inf") if limit == 0 else value * 100.0 / limit


def publications(raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> tuple[Publication, ...]:
    """The ``pub`` part of a script's reply (cjson encodes an empty list as ``{}``)."""
    if isinstance(raw, Mapping):
        return ()
    return tuple(
        Publication(
            task_id=str(item["id"]),
            envelope=json.loads(item["msg"]),
            handoff=item.get("token") or None,
            again=bool(item.get("again")),
        )
        for item in raw
        if item.get("msg")
    )


def _list(raw: Any) -> list[Any]:
    return [] if isinstance(raw, Mapping) else list(raw or [])


_FINISHED = {"type": AuditEventType.TASK_FINISHED.value, "decision": "allow"}


class AdmissionRequest(TypedDict, total=False):
    """What :meth:`Admitter.admit` is asked: one delivery of one attempt of a task.

    ``holder`` identifies this delivery (a fresh id per execution); ``handoff`` is the token of
    a message handed on from the wait list; ``envelope`` the message (JSON) when the ledger may
    not have it yet; ``outage`` (count, since ms) the deferrals it went through while the state
    store was down; ``reclaim`` false right after an outage of the store, so live workers get to
    renew their leases before anyone takes them. ``cost_alert_approved``: reviewers' verified
    signatures let this call go past its run's cost alert, up to this new threshold (micro-USD;
    0: the policy's next step). ``now`` picks the day and month windows (default: now).
    Fair dispatch: ``at_publish``: asked by the publisher before it sends anything (the task
    waits from here, or is handed a slot, or its delivery decides: ``WAITING``, ``HANDED``,
    ``SEND``); ``pool_wait``: the worker pool is saturated, so a task that could run waits for
    its tenant's share; ``pool_gated``: capacity is the pool's to give, this call hands nothing
    on; ``queue``: the queue the task goes to (its pool: fair dispatch hands a pool's capacity to
    its tasks only).
    """

    ctx: Required[ActionContext]
    action: Required[Action]
    task_id: Required[str]
    attempt: Required[int]
    estimate: Required[Usage]
    limits: Required[AdmissionLimits]
    holder: str
    handoff: str | None
    envelope: str | None
    template: Mapping[str, str] | None
    outage: tuple[int, int] | None
    reclaim: bool
    cost_alert_approved: int | None
    now: datetime | None
    at_publish: bool
    pool_wait: bool
    pool_gated: bool
    queue: str


class SettlementOptions(TypedDict, total=False):
    """What a settlement may say besides the ticket and the usage. ``entry``: the attempt's
    audit entry ({type, decision, reason, detail}; default ``task_finished``, allow).
    ``next_attempt``: the task is recorded as queued (or parked) for its retry. ``force``:
    settle whatever delivery holds the attempt's lease (``ticket.holder`` is ignored).
    ``reclaim``: handing the freed slot on may take expired leases (default True; False right
    after an outage of the store, whose leases only look expired). ``policy_version``: the
    settling process's policy; a waiting task that began to wait under another one is published
    for its own delivery to decide, not handed the slot under the old limits. ``run_ms``: how
    long the body ran (the tenant's worker time); ``pool_gated``: the worker pool is saturated,
    the freed capacity is the pool's to give (fair dispatch)."""

    entry: Mapping[str, Any] | None
    next_attempt: NextAttempt | None
    force: bool
    reclaim: bool
    policy_version: str
    run_ms: float
    pool_gated: bool


#: The hot path carries seals in batches of this many (or once they are this old); the
#: background flush of each process writes what a quiet chain still owes.
SEAL_BATCH = 32
SEAL_AGE_S = 0.2


class Admitter:
    """Admission, renewal and settlement against one Redis (or Redis Cluster)."""

    def __init__(self, state: StateStore, sealer: AuditSealer | None = None) -> None:
        self._state = state
        self._sealer = sealer
        self._static: dict[int, tuple[AdmissionLimits, Packed]] = {}
        self._settle_static: dict[int, tuple[tuple[BudgetCheck, ...], int, Packed]] = {}

    def _begin(
        self,
        operation: str,
        script: Any,
        tenant: str,
        keys: Args,
        request: list[Any],
        *,
        template: Mapping[str, str],
        reclaim: bool = True,
    ) -> Pending[dict[str, Any]]:
        """Write one call of ``script`` now: its request (with the audit ``template`` its
        entries carry), the settings, and the seals this process owes ``tenant``'s chain (in
        batches, see ``SEAL_BATCH``)."""
        settings = self._state.script_settings(reclaim=reclaim)
        return begin_sealed_call(
            self._state,
            self._sealer,
            operation,
            script,
            tenant,
            keys,
            lambda seals, writer: [*request, settings, seals, writer],
            batch=SEAL_BATCH,
            older_than_s=SEAL_AGE_S,
            template=template,
        )

    def admit(self, **request: Unpack[AdmissionRequest]) -> Admission:
        """Admit one delivery of one attempt of a task, or say what it waits for (the request's
        fields: see :class:`AdmissionRequest`)."""
        return self.begin_admit(**request).result()

    def begin_admit(self, **request: Unpack[AdmissionRequest]) -> Pending[Admission]:
        """:meth:`admit`, written now; the decision is read by ``result()`` (on this thread)."""
        ctx, action, task_id = request["ctx"], request["action"], request["task_id"]
        attempt, estimate, limits = request["attempt"], request["estimate"], request["limits"]
        holder = request.get("holder") or f"{task_id}:{attempt}"
        outage = request.get("outage")
        cost_alert_approved = request.get("cost_alert_approved")
        now = request.get("now")
        keys = TenantKeys(ctx.tenant)
        windows = tuple(keys.windows(ctx.run, now))
        # When the day (and so the month) of those windows ends: a request that waits past it
        # names stale windows, and is evaluated again by its own delivery (lib.lua's handoff).
        day = int((now.timestamp() if now else time.time()) // 86_400)
        provider = action.provider if isinstance(action, LLMCall) else None
        record = keys.task(task_id)
        template = dict(request.get("template") or {"tenant": ctx.tenant, "task_id": task_id})
        ticket = AdmissionTicket.of(ctx, task_id, attempt, holder, limits, template, windows)
        gate: Mapping[str, Any] = _GO
        shared = provider is not None and limits.shared_provider
        if provider is not None and shared:
            # The deployment's provider: its own slot, so its own call, first.
            gate = self._provider_gate(provider, limits) or _GO
        repetitions = limits.long_running.max_same_step_repetitions
        task = ADMISSION_TASK_PART.args(
            id=task_id,
            attempt=attempt,
            holder=holder,
            handoff=request.get("handoff") or "",
            run=ctx.run,
            has_cooldown="1" if provider is not None and not shared else "",
            has_provider_rate=(
                "1" if provider is not None and limits.provider_rate is not None else ""
            ),
            est=(
                estimate.steps,
                estimate.tool_calls,
                estimate.input_tokens,
                estimate.output_tokens,
                estimate.cost_micro_usd,
            ),
            depth=ctx.discovery_depth,
            # The step's identity, hashed only when repetitions are counted.
            step="" if repetitions is None else f"{action.name}:{action.input_hash()}",
            envelope=request.get("envelope") or "",
            outage=outage if outage else ("", ""),
            window_end=(day + 1) * 86_400_000,
            cost_alert_ack="" if cost_alert_approved is None else cost_alert_approved,
            gate_turn=gate["turn"],
            gate_violation=gate["v"],
            gate_wait=gate["wait"],
            queue=request.get("queue") or "",
            at_publish="1" if request.get("at_publish") else "",
            pool_wait="1" if request.get("pool_wait") else "",
            pool_gated="1" if request.get("pool_gated") else "",
        )
        script_keys: list[str | Packed] = [
            _shared_keys(ctx.tenant),
            record,
            keys.cooldown(provider) if provider else keys.placeholder,
            keys.provider_rate(provider) if provider else keys.placeholder,
            *windows,
            keys.step_repetitions(ctx.run),
            keys.queued,
        ]
        reply = self._begin(
            "admission",
            self._state.scripts.admit,
            ctx.tenant,
            script_keys,
            [*task, ticket.template_args, self._limit_args(limits)],
            template=ticket.template,
            reclaim=request.get("reclaim", True),
        )
        return reply.then(lambda raw: _parse_admission(raw, ticket, limits, provider))

    def _provider_gate(self, provider: str, limits: AdmissionLimits) -> dict[str, Any] | None:
        """The deployment-wide cooldown and rate of ``provider``: None when the call may go
        now (its rate token taken), else when it may ({turn, v, wait}) for the admission to
        book (see ``provider_gate.lua``)."""
        keys = ProviderKeys(provider)
        rate = limits.shared_provider_rate
        raw = self._state.call(
            "provider gate",
            self._state.scripts.provider_gate,
            [keys.cooldown, keys.rate],
            PROVIDER_GATE.arrange({"rate": (rate.interval_ms, rate.burst) if rate else ("", "")}),
        )
        gate: dict[str, Any] = json.loads(raw)
        return gate if gate["turn"] else None

    def _limit_args(self, limits: AdmissionLimits) -> Packed:
        """The part of an admission request that only depends on the tenant's limits, encoded
        and packed once per limits object (the hot path encodes only what changes per task)."""
        cached = self._static.get(id(limits))
        if cached is None or cached[0] is not limits:
            cached = (limits, Packed(limit_values(limits, self._ttl())))
            self._static[id(limits)] = cached
        return cached[1]

    def _settlement_limits(self, ticket: AdmissionTicket) -> Packed:
        """The part of a settlement that only depends on the tenant's limits (its budget checks
        and warning threshold) and the store: encoded and packed once per checks."""
        checks, warn = ticket.checks, ticket.warning_threshold_pct
        cached = self._settle_static.get(id(checks))
        if cached is None or cached[0] is not checks or cached[1] != warn:
            values = {
                "ttl": self._ttl(),
                "checks": AdmissionLimits(budget_checks=checks).check_json or "",
                "warn": warn,
            }
            cached = (checks, warn, Packed(SETTLEMENT_LIMITS_PART.arrange(values)))
            self._settle_static[id(checks)] = cached
        return cached[2]

    def _ttl(self) -> list[int]:
        ttl = self._state.ttl
        return [ttl.run_s, ttl.day_s, ttl.month_s, ttl.task_s]

    def renew(self, ticket: AdmissionTicket) -> int:
        """Extend the task's lease; returns the new expiry (ms), or 0 if the lease was lost."""
        keys = TenantKeys(ticket.tenant)
        script_keys = [keys.leases, keys.ledger, keys.task(ticket.task_id), ticket.windows[0]]
        argv = RENEW.arrange(
            {"attempt": str(ticket.attempt), "lease": self._state.lease_ms, "holder": ticket.holder}
        )
        return int(self._state.call("lease renewal", self._state.scripts.renew, script_keys, argv))

    def settle_killed(
        self,
        ticket: AdmissionTicket,
        actual: Usage,
        *,
        entry: Mapping[str, Any],
    ) -> Settlement:
        """Settle an attempt whose process was killed while it ran (a hard time limit), from
        outside it: whatever delivery holds the attempt's lease (``ticket.holder`` is ignored).
        A no-op if the attempt is not running any more."""
        return self.settle(ticket, actual, entry=entry, force=True)

    def settle(
        self, ticket: AdmissionTicket, actual: Usage, **options: Unpack[SettlementOptions]
    ) -> Settlement:
        """Release the lease and count ``actual`` instead of the reservation (at most once;
        the options: see :class:`SettlementOptions`)."""
        return self.begin_settle(ticket, actual, **options).result()

    def begin_settle(
        self, ticket: AdmissionTicket, actual: Usage, **options: Unpack[SettlementOptions]
    ) -> Pending[Settlement]:
        """:meth:`settle`, written now; what it did is read by ``result()`` (on this thread).
        Nothing is settled twice if it is called again after a failure."""
        entry = options.get("entry") or _FINISHED
        nxt = options.get("next_attempt")
        run = ticket.run_in_flight
        detail = entry.get("detail")
        keys = TenantKeys(ticket.tenant)
        request = SETTLEMENT_TASK_PART.args(
            id=ticket.task_id,
            attempt=ticket.attempt,
            holder=ticket.holder,
            force="1" if options.get("force", False) else "",
            actual=(
                actual.steps,
                actual.tool_calls,
                actual.input_tokens,
                actual.output_tokens,
                actual.cost_micro_usd,
            ),
            entry=(entry["type"], entry.get("decision", ""), entry.get("reason") or ""),
            entry_detail=to_json(detail).decode() if detail else "",
            run=run[0] if run else "",
            run_idle_ms=run[1] if run else "",
            policy_version=options.get("policy_version") or "",
            next_msg=nxt.envelope_json if nxt else "",
            next_due=nxt.due_ms if nxt else "",
            next_parked="1" if nxt and nxt.parked else "",
            run_ms=round(options.get("run_ms", 0)),
            pool_gated="1" if options.get("pool_gated") else "",
        )
        reply = self._begin(
            "settlement",
            self._state.scripts.settle,
            ticket.tenant,
            [_shared_keys(ticket.tenant), keys.task(ticket.task_id), *ticket.windows],
            [*request, ticket.template_args, self._settlement_limits(ticket)],
            template=ticket.template,
            reclaim=options.get("reclaim", True),
        )
        return reply.then(lambda raw: _parse_settlement(raw, ticket))


@lru_cache(maxsize=4096)
def _shared_keys(tenant: str) -> Packed:
    """The tenant's shared keys (``TenantKeys.shared``), packed once per tenant."""
    return Packed(TenantKeys(tenant).shared())


#: The answer of the deployment provider's gate when the call may go now.
_GO: Mapping[str, Any] = {"turn": "", "v": "", "wait": ""}


def _parse_settlement(reply: Mapping[str, Any], ticket: AdmissionTicket) -> Settlement:
    outcome = reply["s"]
    if outcome == "noop":
        return Settlement(settled=False)
    warnings = []
    before, after = _list(reply.get("before")), _list(reply.get("after"))
    for i, check in enumerate(ticket.checks):
        crossed = (
            _percent(before[i], check.limit)
            < ticket.warning_threshold_pct
            <= _percent(after[i], check.limit)
        )
        warning = _warning(check, after[i], ticket.warning_threshold_pct) if crossed else None
        if warning is not None:
            warnings.append(warning)
    return Settlement(
        settled=True,
        late=outcome == "late",
        warnings=tuple(warnings),
        publish=publications(reply.get("pub") or []),
        pool_grant=str(reply.get("pool") or ""),
        waiting=int(reply.get("waiting") or 0),
    )


def _parse_admission(
    reply: Mapping[str, Any],
    ticket: AdmissionTicket,
    limits: AdmissionLimits,
    provider: str | None,
) -> Admission:
    status = AdmissionStatus(reply["s"])
    name = str(reply.get("v") or "")
    wait_ms = int(reply.get("wait") or 0)
    check_index = int(reply.get("ci") or 0)
    check_values = _list(reply.get("cv"))
    violation: Violation | None = None
    if status in (
        AdmissionStatus.WAITING,
        AdmissionStatus.BOOKED,
        AdmissionStatus.REJECTED,
        AdmissionStatus.COST_ALERT,
    ):
        current, limit = reply.get("cur") or 0, reply.get("lim") or 0
        if status is AdmissionStatus.COST_ALERT:
            violation = Violation(
                ViolationType.cost_alert,
                _micro_to_usd(current),
                _micro_to_usd(limit),
                message=f"cost alert: run {ticket.template.get('run', '?')!r} has cost "
                f"${_micro_to_usd(current):.4f}, at or over its alert threshold of "
                f"${_micro_to_usd(limit):.4f}; a reviewer must approve before it goes on",
            )
        elif check_index > 0:
            violation = _violation(limits.budget_checks[check_index - 1], current, limit)
        elif name == "cooldown":
            violation = Violation(
                ViolationType.cooldown,
                wait_ms,
                0,
                message=f"cooldown: provider {provider!r} asked to wait (Retry-After); "
                f"{wait_ms} ms left",
            )
        elif name.startswith("rate_limit:"):
            scope = name.split(":", 1)[1]
            rate = limits.tenant_rate if scope == "tenant" else limits.provider_rate
            what = f"tenant {ticket.tenant!r}" if scope == "tenant" else f"provider {provider!r}"
            described = rate.describe() if rate else "?"
            violation = Violation(
                ViolationType.rate_limit,
                int(limit) + 1,
                int(limit),
                message=f"rate_limit exceeded: {what} allows {described}; turn in {wait_ms} ms",
            )
        elif name in ViolationType.__members__:
            violation = Violation(ViolationType(name), current, limit)
        if status is AdmissionStatus.REJECTED and reply.get("reason"):
            kind = violation.type if violation else ViolationType.concurrency_limit
            violation = Violation(kind, current, limit, message=str(reply["reason"]))
    return Admission(
        status=status,
        ticket=ticket,
        violation=violation,
        reason=str(reply.get("reason") or (violation.message if violation else "")),
        wait_ms=wait_ms,
        turn_ms=int(reply.get("turn") or 0),
        parked=bool(reply.get("parked")),
        first_wait=bool(reply.get("first")),
        ahead=int(reply.get("ahead") or 0),
        lease_expiry_ms=int(reply.get("le") or 0),
        publish=publications(reply.get("pub") or []),
        check_values=tuple(check_values),
        limits=limits,
        final=bool(reply.get("final")),
        replayed=bool(reply.get("replayed")),
        token=str(reply.get("token") or ""),
        queued_ms=None if reply.get("queued_ms") is None else int(reply["queued_ms"]),
    )
