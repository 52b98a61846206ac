"""The vocabulary the store's Python and its Lua scripts share, declared once, in order.

**Arguments.** Every script takes flat arguments: ``ARGV`` is one string per declared field, in
the order of the script's :class:`ScriptArgs`: the script's own request first, then (for the
scripts that take them) the store's settings, then the seals and the writer of the audit chain.
Names stay in the source: Lua reads ``ARGV[F.holder]`` or, for a request read into a table once,
``req[R.concurrency]``. A value travels as text; ``''`` is "none" for every kind of field (nil
in Lua), so no field needs a sentinel:

- ``int``: a number (``tonumber`` in Lua);
- ``text``: a string;
- ``flag``: ``'1'`` for yes, ``''`` for no (a boolean in Lua);
- ``json``: one JSON text, decoded when the request is read; only for what has no fixed shape
  (the budget checks, an audit entry's detail, the entries appended to a chain).

**Constants, at load time.** ``lua.py`` builds each script's text once, when it registers it
(then it is called by SHA): nothing of this is sent, or built, per call. In the source, a name of
a declared table stands for a constant, and :func:`resolve_names` replaces it by that constant
(a name that is not declared raises then, in Python, not when a rare branch runs):

- ``F.<field>``: the field's position in this script's ``ARGV``; ``F.<group>``: the position
  before the group's first member (its members are ``F.est + 1`` ... ``F.est + n``);
- ``R.<field>``, ``R.<group>``: the same in the admission request (``admit.lua``'s first
  arguments, and the request a waiting task keeps in its record), in every script that shares
  ``lib.lua``;
- ``AT.<type>``: an audit entry type of :class:`AuditEventType` (``AT.seal``: a seal entry);
- ``V.<violation>``: a :class:`ViolationType`.

Before the source, :func:`script_prelude` puts what Lua reads or iterates per call: the readers
of the requests (``read_request``, ``read_settlement``, ``read_settings`` for ``G``), and, for
the scripts that share ``lib.lua``: ``USAGE`` and ``WINDOW_FIELDS`` (the usage fields, and the
fields of a usage window), ``TEMPLATE`` (the fields a task's audit entries share) and
``limit_kinds()``, which gives the limit kinds: ``PHASES`` (in order), ``LIMITS[phase]`` (the
kinds of each, in order), ``VIOLATION[kind]`` and ``HANDOFF[kind]`` (of each wait kind).

**Limit kinds** (:data:`LIMIT_KINDS`): every limit admission checks, in the order it checks
them. Its phase says what a task that hits it does: ``reject`` (waiting does not fix it: the
delivery ends with the reason), ``hold`` (the reviewers decide: the cost alert), ``wait`` (in
the tenant's wait list until the hand-off gives it capacity) or ``book`` (a turn at a known
time is booked). Phases go in that order; within ``reject``, ``hold`` and ``wait`` the first
kind hit decides, within ``book`` the latest turn of all kinds wins. The hand-off effect says
what the hand-off's scan of the wait list does with a waiting task that still hits it:
``publish`` (its own delivery decides: books, rejects or holds it), ``stop`` (the scan ends: no
later task could fit), ``skip`` (passed over, counted against the scan) or ``pass`` (skipped;
from then on, tasks that need the same thing are passed over without counting).

**Adding a limit** takes: a config field (``policy/config.py``, resolved in
``policy/tenant.py``); the field of :class:`~governance.store.limits.AdmissionLimits` that holds
it in script form, set in ``AdmissionLimits.for_action``; a row here (its name, violation,
phase, hand-off effect, the request fields it takes and how each is read from the limits),
with a :class:`ViolationType` member if none fits; and its check function ``C.<name>`` in
``lib.lua``. A check that needs something of the task itself (not of the tenant's limits) also
takes a field in :data:`ADMISSION_TASK`; a wait limit whose hand-off effect is ``pass`` also
says, in ``L.needs.<name>``, which waiting tasks need what it found full. The request, the phase
lists and the hand-off follow from the row. (The audit entry types Lua gets as ``AT`` are
declared in :mod:`governance.store.audit_types`.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governance.policy.limits import ViolationType
from governance.store.audit_types import SEAL_TYPE, TEMPLATE_FIELDS, AuditEventType
from governance.store.keys import WINDOW_ORDER
from governance.store.limits import (
    BUDGET_KIND_TABLE,
    USAGE_FIELDS,
    WINDOW_FIELDS,
    AdmissionLimits,
)

Value = str | int | float


class Kind(StrEnum):
    """How a field's value travels, and what Lua reads it as (see the module's docstring)."""

    INT = "int"
    TEXT = "text"
    FLAG = "flag"
    JSON = "json"


@dataclass(frozen=True)
class Field:
    """One argument of a script."""

    name: str
    kind: Kind
    doc: str


@dataclass(frozen=True)
class Group:
    """Fields that belong together (``est``: steps, ..., cost): each is ``<group>_<member>``,
    and Lua also gets the group's positions as a list (``R.est[i]``)."""

    name: str
    members: tuple[str, ...]
    kind: Kind
    doc: str

    def fields(self) -> tuple[Field, ...]:
        return tuple(
            Field(f"{self.name}_{m}", self.kind, f"{self.doc} ({m})") for m in self.members
        )


Item = Field | Group


def _sized(values: list[Any], size: int, record: str) -> list[Any]:
    if len(values) != size:
        raise ValueError(f"{record}: {size} values, not {len(values)} (a group of another size)")
    return values


class Record:
    """Fields in order: a script's request, or a part of its arguments that several scripts
    share (the settings, the seals). ``reader`` names the Lua function that reads it into a
    table (by position, or by name when ``named``)."""

    def __init__(
        self,
        name: str,
        doc: str,
        items: Sequence[Item],
        *,
        reader: str | None = None,
        named: bool = False,
    ) -> None:
        self.name, self.doc = name, doc
        self.reader, self.named = reader, named
        fields: list[Field] = []
        groups: dict[str, tuple[int, ...]] = {}
        for item in items:
            if isinstance(item, Group):
                first = len(fields) + 1
                fields += item.fields()
                groups[item.name] = tuple(range(first, len(fields) + 1))
            else:
                fields.append(item)
        self.fields = tuple(fields)
        self.names = tuple(f.name for f in fields)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: a field is declared twice")
        self.positions = {n: i for i, n in enumerate(self.names, start=1)}
        self.groups = groups
        #: What ``arrange`` takes: each field, or each group as one sequence (and its size).
        self.items = tuple(
            (item.name, len(item.members) if isinstance(item, Group) else 0) for item in items
        )
        for item_name, _ in self.items:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", item_name):
                raise ValueError(f"{name}: {item_name!r} is not a plain name")
        # One function taking the declared names as keywords and returning one list display,
        # built from the declared names only: arranging a request is on the hot path, and this
        # is a fraction of a loop over the items (or of building a mapping first).
        params = ", ".join(n for n, _ in self.items)
        display = ", ".join(f"*{n}" if size else n for n, size in self.items)
        sized = f"_sized([{display}], {len(self.fields)}, {name!r})"
        self.args: Callable[..., list[Any]] = eval(
            f"lambda *, {params}: {sized}", {"_sized": _sized}
        )

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, name: str) -> int:
        """The 1-based position of ``name`` within the record."""
        return self.positions[name]

    def arrange(self, values: Mapping[str, Any]) -> list[Any]:
        """The arguments in the declared order, from ``values``: one (encoded: see
        :func:`encode`) per field, and per group a sequence of its members' values. Every field
        and group must be given, and nothing else. (``args(**values)`` is the same, checked as
        far as a call checks its keywords: for the hot path.)"""
        try:
            out = self.args(**values)
        except (TypeError, ValueError):
            out = []
        if len(values) != len(self.items) or len(out) != len(self.fields):
            given, wanted = set(values), {name for name, _ in self.items}
            sizes = {n: len(values[n]) for n, size in self.items if size and n in values}
            raise ValueError(
                f"{self.name}: unknown {sorted(given - wanted)}, missing "
                f"{sorted(wanted - given)}; groups of {dict(self.items)}, given {sizes}"
            )
        return out

    def encode(self, values: Sequence[Any]) -> list[Value]:
        """Plain Python values (None for none, booleans for flags), one per field in order,
        encoded as the fields carry them (off the hot path: the limits, once per object)."""
        if len(values) != len(self.fields):
            raise ValueError(f"{self.name}: {len(self.fields)} values, not {len(values)}")
        return [encode(f.kind, v) for f, v in zip(self.fields, values, strict=True)]


def encode(kind: Kind, value: Any) -> Value:
    """A Python value as a field of ``kind`` carries it (None is ``''``)."""
    if value is None:
        return ""
    if kind is Kind.FLAG:
        return "1" if value else ""
    if kind is Kind.INT:
        if isinstance(value, bool):
            return int(value)
        if not isinstance(value, int | float):
            raise TypeError(f"an int field takes a number, not {value!r}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a {kind} field takes text, not {value!r}")
    return value


def template_values(template: Mapping[str, str]) -> list[str]:
    """An audit template (the fields a task's entries share) as the scripts take it: one value
    per field of ``TEMPLATE_FIELDS``, '' for those it has not."""
    if not template.keys() <= _TEMPLATE_SET:
        unknown = sorted(set(template) - _TEMPLATE_SET)
        raise ValueError(f"an audit template has only {TEMPLATE_FIELDS}, not {unknown}")
    return [template.get(name, "") for name in TEMPLATE_FIELDS]


_TEMPLATE_SET = frozenset(TEMPLATE_FIELDS)


# -- limit kinds -------------------------------------------------------------------------------


class Phase(StrEnum):
    """What a task that hits a limit does (in this order: see the module's docstring)."""

    REJECT = "reject"
    HOLD = "hold"
    WAIT = "wait"
    BOOK = "book"


class Handoff(StrEnum):
    """What the hand-off's scan of the wait list does with a task that hits the limit."""

    PUBLISH = "publish"
    STOP = "stop"
    SKIP = "skip"
    PASS = "pass"


#: The order of the phases.
PHASES = (Phase.REJECT, Phase.HOLD, Phase.WAIT, Phase.BOOK)


@dataclass(frozen=True)
class LimitKind:
    """One limit admission checks. ``fields`` are the request fields it takes from the tenant's
    limits and ``values`` reads them (one value per field, in order, before encoding)."""

    name: str
    violations: tuple[ViolationType, ...]
    phase: Phase
    handoff: Handoff
    doc: str
    fields: tuple[Item, ...] = ()
    values: Callable[[AdmissionLimits], Sequence[Any]] = field(default=lambda _limits: ())

    def __post_init__(self) -> None:
        if self.phase is not Phase.WAIT and self.handoff is not Handoff.PUBLISH:
            raise ValueError(f"{self.name}: only a wait limit keeps a task in the wait list")


def _rate(rate: Any) -> tuple[float | None, int | None]:
    return (rate.interval_ms, rate.burst) if rate is not None else (None, None)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


LIMIT_KINDS: tuple[LimitKind, ...] = (
    LimitKind(
        "wall_time",
        (ViolationType.wall_time_limit,),
        Phase.REJECT,
        Handoff.PUBLISH,
        "the run's wall time, from its first admitted step, past the limit and its grace",
        (
            Field("wall_time_ms", Kind.INT, "the run's wall-time limit (ms); '': none"),
            Field("wall_time_grace_ms", Kind.INT, "the grace after it (ms)"),
        ),
        lambda limits: (limits.wall_time_ms, limits.wall_time_grace_ms),
    ),
    LimitKind(
        "discovery_depth",
        (ViolationType.discovery_depth_limit,),
        Phase.REJECT,
        Handoff.PUBLISH,
        "the step's discovery depth (task field `depth`) over the limit",
        (Field("max_depth", Kind.INT, "the deepest discovery depth allowed; '': none"),),
        lambda limits: (limits.long_running.max_discovery_depth,),
    ),
    LimitKind(
        "discovered_steps",
        (ViolationType.discovered_step_limit,),
        Phase.REJECT,
        Handoff.PUBLISH,
        "steps discovered in the run (children, counted once per task) over the limit",
        (Field("max_discovered", Kind.INT, "discovered steps allowed per run; '': none"),),
        lambda limits: (limits.long_running.max_discovered_steps,),
    ),
    LimitKind(
        "idle",
        (ViolationType.idle_timeout,),
        Phase.REJECT,
        Handoff.PUBLISH,
        "the run idle from its last activity to when this step came",
        (Field("idle_ms", Kind.INT, "the run's idle timeout (ms); '': none"),),
        lambda limits: (_ms(limits.long_running.idle_timeout_s),),
    ),
    LimitKind(
        "same_step",
        (ViolationType.same_step_loop,),
        Phase.REJECT,
        Handoff.PUBLISH,
        "the same step (task field `step`) admitted too often in the run",
        (Field("max_repetitions", Kind.INT, "admissions of one step per run; '': none"),),
        lambda limits: (limits.long_running.max_same_step_repetitions,),
    ),
    LimitKind(
        "budget",
        tuple(k.violation for k in BUDGET_KIND_TABLE),
        Phase.REJECT,
        Handoff.PUBLISH,
        "a budget spent without the reservations of tasks in flight (the violation of its kind)",
        (
            Field(
                "checks",
                Kind.JSON,
                "the budgets: [[window 1..3 (run, day, month), limit, first and last usage field "
                "it sums (1-based in USAGE_FIELDS), violation], ...] (budget_check_args)",
            ),
            Group(
                "reserve",
                ("run", "day", "month"),
                Kind.FLAG,
                "the window has a budget: the estimate is reserved there",
            ),
        ),
        lambda limits: (
            limits.check_json,
            *(w in limits.reserved_windows for w in range(1, len(WINDOW_ORDER) + 1)),
        ),
    ),
    LimitKind(
        "cost_alert",
        (ViolationType.cost_alert,),
        Phase.HOLD,
        Handoff.PUBLISH,
        "the run's cost at its alert (rejected once reviewers stopped the run there)",
        (Field("cost_alert", Kind.INT, "the run's cost alert (micro-USD); '': none"),),
        lambda limits: (limits.cost_alert_micro,),
    ),
    LimitKind(
        "paused",
        (ViolationType.paused,),
        Phase.WAIT,
        Handoff.STOP,
        "the tenant paused by an operator (its control hash): nothing of it starts",
    ),
    LimitKind(
        "budget_in_flight",
        tuple(k.violation for k in BUDGET_KIND_TABLE),
        Phase.WAIT,
        Handoff.SKIP,
        "a budget over only with the reservations of tasks in flight (a later task may fit)",
    ),
    LimitKind(
        "concurrency",
        (ViolationType.concurrency_limit,),
        Phase.WAIT,
        Handoff.STOP,
        "the tenant's running tasks (leases) at the limit: no later task could have a slot",
        (Field("concurrency", Kind.INT, "tasks of the tenant running at once; '': no limit"),),
        lambda limits: (limits.concurrency,),
    ),
    LimitKind(
        "run_concurrency",
        (ViolationType.run_concurrency_limit,),
        Phase.WAIT,
        Handoff.PASS,
        "a step of a run not in flight while the tenant's runs in flight are at the limit",
        (
            Field("run_concurrency", Kind.INT, "runs in flight allowed; '': no limit"),
            Field("run_idle_ms", Kind.INT, "how long a run stays in flight after a step (ms)"),
        ),
        lambda limits: (limits.run_concurrency, limits.run_idle_ms),
    ),
    LimitKind(
        "cooldown",
        (ViolationType.cooldown,),
        Phase.BOOK,
        Handoff.PUBLISH,
        "the tenant's cooldown of the provider (a Retry-After; task field `has_cooldown`)",
    ),
    LimitKind(
        "tenant_rate",
        (ViolationType.rate_limit,),
        Phase.BOOK,
        Handoff.PUBLISH,
        "the tenant's rate (GCRA): the next conforming turn",
        (
            Group(
                "tenant_rate",
                ("interval_ms", "burst"),
                Kind.INT,
                "the tenant's rate; '': none",
            ),
        ),
        lambda limits: _rate(limits.tenant_rate),
    ),
    LimitKind(
        "provider_rate",
        (ViolationType.rate_limit,),
        Phase.BOOK,
        Handoff.PUBLISH,
        "the tenant's rate for the provider (task field `has_provider_rate`)",
        (
            Group(
                "provider_rate",
                ("interval_ms", "burst"),
                Kind.INT,
                "the tenant's rate for the call's provider; '': none",
            ),
        ),
        lambda limits: _rate(limits.provider_rate),
    ),
    LimitKind(
        "provider_gate",
        (ViolationType.cooldown, ViolationType.rate_limit),
        Phase.BOOK,
        Handoff.PUBLISH,
        "the deployment's provider, asked first (provider_gate.lua; task fields `gate_*`)",
    ),
)

LIMIT_KIND: dict[str, LimitKind] = {kind.name: kind for kind in LIMIT_KINDS}


def _check_limit_kinds() -> None:
    order = [PHASES.index(kind.phase) for kind in LIMIT_KINDS]
    if order != sorted(order):
        raise ValueError("LIMIT_KINDS must be declared phase by phase, in the order of PHASES")


_check_limit_kinds()


# -- the records ---------------------------------------------------------------------------------

#: The part of the admission request that changes with every task.
ADMISSION_TASK: tuple[Item, ...] = (
    Field("id", Kind.TEXT, "the task's id"),
    Field("attempt", Kind.INT, "the attempt (Celery's retries): 0, 1, ..."),
    Field("holder", Kind.TEXT, "this delivery (a fresh id per execution): it holds the lease"),
    Field("handoff", Kind.TEXT, "the hand-off token the message carries; '': none"),
    Field("run", Kind.TEXT, "the run's id"),
    Field("has_cooldown", Kind.FLAG, "the provider's cooldown applies: KEYS[9] is its key"),
    Field(
        "has_provider_rate",
        Kind.FLAG,
        "the tenant's rate for the provider applies: KEYS[10] is its key",
    ),
    Group(
        "est", USAGE_FIELDS, Kind.INT, "the estimate (the most the task may use; cost micro-USD)"
    ),
    Field("depth", Kind.INT, "the step's discovery depth (0: not discovered by another step)"),
    Field(
        "step",
        Kind.TEXT,
        "the step's identity (action:input hash) for its repetitions; '': not counted",
    ),
    Field("envelope", Kind.TEXT, "the message (JSON), when the ledger may not have it; ''"),
    Group(
        "outage",
        ("count", "since"),
        Kind.INT,
        "deferrals while the store was down, and since when (ms); '': none",
    ),
    Field("window_end", Kind.INT, "when the day (and month) windows of the keys end (ms)"),
    Field(
        "cost_alert_ack",
        Kind.INT,
        "reviewers approved this call past its cost alert: the new threshold (micro-USD), 0 for "
        "the policy's next step; '': no approval",
    ),
    Field(
        "gate_turn",
        Kind.INT,
        "the deployment's provider (provider_gate.lua): the earliest turn of the call (ms); '': "
        "it may go now",
    ),
    Field("gate_violation", Kind.TEXT, "what the gate waits for: cooldown or rate_limit:provider"),
    Field("gate_wait", Kind.INT, "how long from now (ms)"),
    Field("queue", Kind.TEXT, "the queue the task goes to (its worker pool); '': the default"),
    Field(
        "at_publish",
        Kind.FLAG,
        "asked by the publisher, before any broker message: a task that must wait waits from "
        "here; one that may run is handed a slot (its message carries the token); anything else "
        "is left to its delivery",
    ),
    Field(
        "pool_wait",
        Kind.FLAG,
        "the worker pool is saturated: at publication the task waits for its tenant's fair "
        "share even when its tenant's limits would let it run",
    ),
    Field(
        "pool_gated",
        Kind.FLAG,
        "the worker pool is saturated: freed capacity goes through the pool (fair dispatch), "
        "so this call hands nothing on itself",
    ),
)

#: The audit fields every entry about one task shares (its "template"): the same for the
#: admission and the settlement of an attempt, encoded once per attempt.
AUDIT_TEMPLATE = Group("au", TEMPLATE_FIELDS, Kind.TEXT, "the audit fields of the task's entries")

#: The part of the admission request that depends on the tenant's limits only: encoded once
#: per limits object (its order: these fields, then each limit kind's, in LIMIT_KINDS' order).
ADMISSION_LIMITS: tuple[Item, ...] = (
    Group("ttl", ("run", "day", "month", "task"), Kind.INT, "seconds kept after the last write"),
    Field("max_wait", Kind.INT, "how long the task may wait, in line or for a turn (ms)"),
    Field("warn", Kind.INT, "the warning threshold (percent of a limit)"),
    *(item for kind in LIMIT_KINDS for item in kind.fields),
)

ADMISSION = Record(
    "admission request",
    "one delivery of one attempt of a task asks to run (admit.lua); a waiting task keeps it",
    (*ADMISSION_TASK, AUDIT_TEMPLATE, *ADMISSION_LIMITS),
    reader="read_request",
)
#: The parts of the admission request, as the caller arranges them: per call, then the audit
#: template (per attempt, shared with the settlement: ``template_values``), then per limits.
ADMISSION_TASK_PART = Record("admission request (task)", "per call", ADMISSION_TASK)
ADMISSION_LIMITS_PART = Record("admission request (limits)", "per limits", ADMISSION_LIMITS)


def limit_values(limits: AdmissionLimits, ttl: Sequence[int]) -> list[Value]:
    """The limits' part of the admission request, encoded (once per limits object)."""
    plain: list[Any] = [*ttl, limits.max_wait_ms, limits.warning_threshold_pct]
    for kind in LIMIT_KINDS:
        plain += kind.values(limits)
    return ADMISSION_LIMITS_PART.encode(plain)


#: The part of the settlement that changes with every call.
SETTLEMENT_TASK: tuple[Item, ...] = (
    Field("id", Kind.TEXT, "the task's id"),
    Field("attempt", Kind.INT, "the attempt"),
    Field("holder", Kind.TEXT, "the delivery that ran it"),
    Field("force", Kind.FLAG, "settle whoever holds the lease (a hard time limit)"),
    Group("actual", USAGE_FIELDS, Kind.INT, "what the attempt used (cost micro-USD)"),
    Group("entry", ("type", "decision", "reason"), Kind.TEXT, "the attempt's audit entry"),
    Field("entry_detail", Kind.TEXT, "the entry's detail, JSON text stored as sent; '': none"),
    Field("run", Kind.TEXT, "the run, when the tenant limits runs in flight; '': it does not"),
    Field("run_idle_ms", Kind.INT, "how long the run stays in flight after this step (ms)"),
    Field("policy_version", Kind.TEXT, "the settling process's policy (see L.handoff); ''"),
    Field("next_msg", Kind.TEXT, "the retry's message; '': no retry follows"),
    Field("next_due", Kind.INT, "when the retry is due (ms)"),
    Field("next_parked", Kind.FLAG, "the retry is parked (not a broker countdown)"),
    Field("run_ms", Kind.INT, "how long the body ran (ms): the tenant's worker time"),
    Field("pool_gated", Kind.FLAG, "the worker pool is saturated: hand nothing on (see admit)"),
)

#: The part of the settlement that depends on the tenant's limits (and the store) only.
SETTLEMENT_LIMITS: tuple[Item, ...] = (
    Group("ttl", ("run", "day", "month", "task"), Kind.INT, "seconds kept after the last write"),
    Field("checks", Kind.JSON, "the budgets, as in the admission request"),
    Field("warn", Kind.INT, "the warning threshold (percent)"),
)

SETTLEMENT = Record(
    "settlement",
    "one admitted attempt ends (settle.lua)",
    (*SETTLEMENT_TASK, AUDIT_TEMPLATE, *SETTLEMENT_LIMITS),
    reader="read_settlement",
)
SETTLEMENT_TASK_PART = Record("settlement (task)", "per call", SETTLEMENT_TASK)
SETTLEMENT_LIMITS_PART = Record("settlement (limits)", "per limits", SETTLEMENT_LIMITS)

SETTINGS = Record(
    "settings",
    "the store's timings (StateStore.script_settings)",
    (
        Field("lease", Kind.INT, "a lease (ms)"),
        Field("grace", Kind.INT, "how long a published task may go unreceived (ms)"),
        Field("grace_max", Kind.INT, "the longest that grace grows to (ms)"),
        Field("countdown_limit", Kind.INT, "the longest wait published as a countdown (ms)"),
        Field("scan", Kind.INT, "waiting tasks a hand-off skips looking for one that fits"),
        Field("slack", Kind.INT, "how early a booked task may arrive (ms)"),
        Field("sweep_limit", Kind.INT, "tasks a hand-off or a sweep moves per call"),
        Field(
            "reclaim", Kind.FLAG, "leases of dead holders may be taken (not just after an outage)"
        ),
    ),
    reader="read_settings",
    named=True,
)

SEALS = Record(
    "seals",
    "the audit seals this writer owes the chain",
    (
        Field("seals", Kind.TEXT, "seals of the writer's earlier entries (JSON [[seq, mac], ...])"),
        Field("writer", Kind.TEXT, "the writer's id"),
    ),
)

SWEEP = Record(
    "sweep",
    "the reconciler's round for one tenant (sweep.lua)",
    (
        Group("close", ("tenant", "run", "by"), Kind.TEXT, "a run to close first; '': none"),
        Field("policy_version", Kind.TEXT, "the caller's policy (see L.handoff); '': any"),
        Field("pool_gated", Kind.FLAG, "the worker pool is saturated: hand nothing on"),
    ),
)

DISPATCH = Record(
    "dispatch",
    "the pool gave the tenant capacity: hand it to the tenant's oldest waiting tasks "
    "(dispatch.lua)",
    (
        Field("grants", Kind.JSON, "the pool's grant tokens, one per task it may hand on"),
        Field("queue", Kind.TEXT, "the pool's queue: only tasks that go to it are handed on"),
        Field("policy_version", Kind.TEXT, "the caller's policy (see L.handoff); '': any"),
    ),
)

POOL_DISPATCH = Record(
    "pool dispatch",
    "the pool of a queue learns what ended, who waits, and gives freed capacity to the tenant "
    "furthest below its fair share (pool_dispatch.lua)",
    (
        Field("completed", Kind.TEXT, "the grant of a dispatched task that ended; '': none"),
        Field("completed_tenant", Kind.TEXT, "the tenant of a task that ended; '': none"),
        Field("completed_cost", Kind.INT, "what it is charged (ms, tasks or tokens)"),
        Field("completed_run_ms", Kind.INT, "how long it ran (ms)"),
        Field("returned", Kind.JSON, "grant tokens a tenant could not use; '': none"),
        Field("returned_tenant", Kind.TEXT, "their tenant; '': none"),
        Field("returned_done", Kind.FLAG, "that tenant has nothing the pool can give capacity to"),
        Field(
            "returned_blocked",
            Kind.FLAG,
            "because its own limits stand in the way: it keeps its place, passed over",
        ),
        Field(
            "register",
            Kind.JSON,
            "tenants with tasks waiting for the pool: [[tenant, weight], ...]; '': none",
        ),
        Field("saturate", Kind.FLAG, "the broker is backlogged: tasks wait for the pool from now"),
        Field("dispatch", Kind.FLAG, "give freed capacity to a tenant (else: only take note)"),
        Field("capacity", Kind.INT, "the pool's capacity set by the policy; '': its live workers'"),
        Field("prefetch", Kind.INT, "messages a pool process prefetches"),
        Field("slack_ms", Kind.INT, "estimated work per pool process the broker may hold (ms)"),
        Field("default_run_ms", Kind.INT, "a task's run time, before its tenant has a history"),
        Field("default_cost", Kind.INT, "a task's cost, before its tenant has a history"),
        Field("grant_ttl_ms", Kind.INT, "when a grant whose task never ends is given back (ms)"),
    ),
)

POOL_WORKER = Record(
    "pool worker",
    "a worker of the pool says it is alive, and its pool size (pool_worker.lua)",
    (
        Field("node", Kind.TEXT, "the worker's node name"),
        Field("concurrency", Kind.INT, "its pool size; 0: it leaves"),
        Field("ttl_ms", Kind.INT, "until its next heartbeat (ms)"),
    ),
)

AUDIT_APPEND = Record(
    "audit append",
    "entries appended to a chain (audit_append.lua)",
    (
        Field("entries", Kind.JSON, "the entries: [{field: value, ...}, ...]"),
        Field("record_ttl", Kind.INT, "with KEYS[8]: seconds the ended ledger record is kept"),
    ),
)

REMOVED_TENANT = Record(
    "removed tenant",
    "a tenant no longer in the policy: its tasks wait for it, end, or go on when it comes back "
    "(removed_tenant.lua)",
    (
        Field("mode", Kind.TEXT, "notice | deliver | end | restore"),
        Field("tenant", Kind.TEXT, "the tenant's name (in its entries)"),
        Field("id", Kind.TEXT, "deliver: the delivered task's id (KEYS[8] its record)"),
        Field("removal_grace", Kind.INT, "notice, deliver: how long its tasks wait for it (ms)"),
        Field("reason", Kind.TEXT, "why its tasks end"),
        Field("by", Kind.TEXT, "the operator who ends them now; '': the maintenance"),
        Field("cursor", Kind.TEXT, "end, restore: where the walk of its ledger goes on ('0')"),
        Field("ttl", Kind.INT, "seconds an ended ledger record is kept"),
    ),
)

HELD_PUT = Record(
    "hold",
    "a task held for reviewers, or a suggestion (held_put.lua)",
    (
        Field("id", Kind.TEXT, "the task's id"),
        Field("status", Kind.TEXT, "held or suggested"),
        Field("requested_ms", Kind.INT, "when it was held (ms)"),
        Field("expires_ms", Kind.INT, "when the hold expires (ms)"),
        Field("task", Kind.JSON, "the held task's fields ({name: text}, see held.py)"),
        Group("au", TEMPLATE_FIELDS, Kind.TEXT, "the audit fields of the task's entries"),
        Field("reason", Kind.TEXT, "why it is held"),
        Field("detail", Kind.JSON, "the entry's detail (an object)"),
        Field("notify", Kind.TEXT, "the notification (JSON) to file; '': none"),
        Field("ttl", Kind.INT, "seconds an ended ledger record is kept"),
    ),
)

HELD_DECIDE = Record(
    "held decision",
    "a reviewer's decision on a held task, or its expiry (held_decide.lua)",
    (
        Field("id", Kind.TEXT, "the task's id"),
        Field("verdict", Kind.TEXT, "approve, reject or expire"),
        Field("reviewer", Kind.TEXT, "who decided"),
        Field("reason", Kind.TEXT, "why"),
        Field("now", Kind.INT, "when (ms)"),
        Field("quorum", Kind.INT, "approvals that release the task"),
        Field("signed", Kind.JSON, "the signed decision; '': none"),
        Field("seen", Kind.INT, "approvals the release was built from"),
        Field("release", Kind.TEXT, "the message to publish if this completes the quorum; ''"),
        Field("grant_id", Kind.TEXT, "the grant its approvals asked for; '': none"),
        Field("grant_json", Kind.TEXT, "the grant, as stored (JSON)"),
        Field("grant_until_ms", Kind.INT, "until when it holds (ms)"),
        Group("au", TEMPLATE_FIELDS, Kind.TEXT, "the audit fields of the task's entries"),
        Field("ttl", Kind.INT, "seconds an ended ledger record is kept"),
    ),
)

GRANT_REVOKE = Record(
    "grant revocation",
    "a grant removed (grant_revoke.lua)",
    (
        Field("id", Kind.TEXT, "the grant's id"),
        Group("au", TEMPLATE_FIELDS, Kind.TEXT, "the audit fields of the entry"),
    ),
)

RENEW = Record(
    "lease renewal",
    "a running task's heartbeat (renew.lua)",
    (
        Field("attempt", Kind.TEXT, "the attempt (compared with the record's, as text)"),
        Field("lease", Kind.INT, "the lease (ms)"),
        Field("holder", Kind.TEXT, "the delivery that holds it"),
    ),
)

COOLDOWN = Record(
    "cooldown",
    "a provider asked callers to wait (cooldown.lua)",
    (Field("wait_ms", Kind.INT, "how long (ms)"),),
)

PROVIDER_GATE = Record(
    "provider gate",
    "may a call go to a provider shared by the deployment (provider_gate.lua)",
    (Group("rate", ("interval_ms", "burst"), Kind.INT, "the provider-wide rate; '': none"),),
)


@dataclass(frozen=True)
class ScriptArgs:
    """The ARGV of one script: its records, in order."""

    script: str
    records: tuple[Record, ...]
    library: bool

    def offset(self, record: Record) -> int:
        """How many arguments come before ``record``."""
        offset = 0
        for r in self.records:
            if r is record:
                return offset
            offset += len(r)
        raise KeyError(record.name)


#: Every script's arguments. The request of a script comes first, so ``read_request(ARGV)``
#: reads the admission request at the same positions as a waiting task's stored one.
SCRIPT_ARGS: dict[str, ScriptArgs] = {
    s.script: s
    for s in (
        ScriptArgs("admit", (ADMISSION, SETTINGS, SEALS), library=True),
        ScriptArgs("settle", (SETTLEMENT, SETTINGS, SEALS), library=True),
        ScriptArgs("sweep", (SWEEP, SETTINGS, SEALS), library=True),
        ScriptArgs("dispatch", (DISPATCH, SETTINGS, SEALS), library=True),
        ScriptArgs("pool_dispatch", (POOL_DISPATCH,), library=False),
        ScriptArgs("pool_worker", (POOL_WORKER,), library=False),
        ScriptArgs("audit_append", (AUDIT_APPEND, SEALS), library=True),
        ScriptArgs("removed_tenant", (REMOVED_TENANT, SETTINGS, SEALS), library=True),
        ScriptArgs("held_put", (HELD_PUT, SEALS), library=True),
        ScriptArgs("held_decide", (HELD_DECIDE, SETTINGS, SEALS), library=True),
        ScriptArgs("grant_revoke", (GRANT_REVOKE, SEALS), library=True),
        ScriptArgs("renew", (RENEW,), library=False),
        ScriptArgs("cooldown", (COOLDOWN,), library=False),
        ScriptArgs("provider_gate", (PROVIDER_GATE,), library=False),
    )
}


# -- the Lua side -------------------------------------------------------------------------------


def _lua_str(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_:.\- ]*", text):
        raise ValueError(f"not a plain Lua string: {text!r}")
    return f"'{text}'"


def _lua_list(items: Iterable[str | int]) -> str:
    return "{" + ", ".join(_lua_str(i) if isinstance(i, str) else str(i) for i in items) + "}"


def _lua_map(items: Iterable[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k} = {_lua_str(v)}" for k, v in items) + "}"


def _read(field: Field, source: str) -> str:
    """The Lua expression that reads ``field`` from ``source`` (an ARGV element)."""
    if field.kind is Kind.INT:
        return f"tonumber({source})"
    if field.kind is Kind.FLAG:
        return f"{source} == '1'"
    if field.kind is Kind.JSON:
        return f"json({source})"
    return f"({source} ~= '' and {source} or nil)"


def _window_reader() -> str:
    """``read_window(key)``: a usage window's fields (``WINDOW_FIELDS``) as numbers (0 when
    absent), with ``has_last`` and ``has_started`` (whether the run window has them), read in
    one ``HMGET`` into a table built by one constructor (sized once, never grown field by
    field)."""
    fields = ", ".join(_lua_str(f) for f in WINDOW_FIELDS)
    values = ", ".join(f"{f} = tonumber(r[{i}]) or 0" for i, f in enumerate(WINDOW_FIELDS, 1))
    last, started = WINDOW_FIELDS.index("last_ms") + 1, WINDOW_FIELDS.index("started_ms") + 1
    return (
        f"local function read_window(key) local r = redis.call('HMGET', key, {fields}) "
        f"return {{{values}, has_last = r[{last}] ~= false, has_started = r[{started}] ~= false}} "
        "end"
    )


def _usage_reader() -> str:
    """``read_usage(key)``: a usage window's used and reserved amounts, as an array of numbers
    in ``WINDOW_FIELDS`` order (0 when absent), read in one ``HMGET`` (what settle.lua moves)."""
    amounts = WINDOW_FIELDS[: 2 * len(USAGE_FIELDS)]
    fields = ", ".join(_lua_str(f) for f in amounts)
    values = ", ".join(f"tonumber(r[{i}]) or 0" for i in range(1, len(amounts) + 1))
    return (
        f"local function read_usage(key) local r = redis.call('HMGET', key, {fields}) "
        f"return {{{values}}} end"
    )


def _reader(record: Record, offset: int) -> str:
    reads = [_read(f, f"a[{offset + i}]") for i, f in enumerate(record.fields, 1)]
    if record.named:
        reads = [f"{f.name} = {r}" for f, r in zip(record.fields, reads, strict=True)]
    return f"local function {record.reader}(a) return {{{', '.join(reads)}}} end"


def _constants(args: ScriptArgs) -> dict[str, dict[str, str]]:
    """The names a script's source may use, by table, and the Lua each one stands for: argument
    positions (a group's name stands for the position before its first member, so its members
    are ``F.est + 1`` ... ``F.est + n``), audit types and violations as strings."""

    def positions(records: Sequence[Record]) -> dict[str, str]:
        out: dict[str, str] = {}
        offset = 0
        for record in records:
            out |= {name: str(offset + i) for name, i in record.positions.items()}
            out |= {name: str(offset + p[0] - 1) for name, p in record.groups.items()}
            offset += len(record)
        return out

    tables = {
        "F": positions(args.records),
        "AT": {t.value: _lua_str(t.value) for t in AuditEventType} | {SEAL_TYPE: "'seal'"},
        "V": {v.name: _lua_str(v.value) for v in ViolationType},
    }
    if args.library:
        tables["R"] = positions([ADMISSION])
    return tables


_NAME = re.compile(r"(?<![\w.])([A-Z]+)\.([a-z_][a-z0-9_]*)")


def resolve_names(script: str, source: str) -> str:
    """``source`` (the script as it is loaded: prelude, library, script) with each declared name
    (``F.holder``, ``R.concurrency``, ``AT.admitted``, ``V.cost_limit``) replaced by what it
    stands for, so nothing of it is looked up per call. A name that is not declared raises here,
    when the script is loaded, not when a rare branch runs. Comments are left as they are."""
    tables = _constants(SCRIPT_ARGS[script])

    def constant(match: re.Match[str]) -> str:
        table, name = match.groups()
        if table not in tables:
            return match.group(0)
        if name not in tables[table]:
            raise ValueError(f"{script}.lua uses {table}.{name}, which is not declared")
        return tables[table][name]

    lines = []
    for line in source.split("\n"):
        code, dashes, comment = line.partition("--")
        lines.append(_NAME.sub(constant, code) + dashes + comment)
    return "\n".join(lines)


_HEADER = """\
-- ---- generated from governance/store/vocabulary.py when the script is loaded: do not edit ----
-- (F.<name>, R.<name>, AT.<type> and V.<violation> in the source below were replaced by the
-- positions and strings they stand for when the script was loaded)
local function text(v) if v == '' then return nil end return v end
local function json(v) if v == nil or v == '' then return nil end return cjson.decode(v) end"""


def script_prelude(script: str) -> str:
    """The Lua that ``lua.py`` puts before the source of ``scripts/<script>.lua`` (and before
    ``lib.lua``, for the scripts that use it): the functions that read its arguments, and the
    tables Lua iterates. (The names of positions and strings are not tables: see
    :func:`resolve_names`.)"""
    args = SCRIPT_ARGS[script]
    lines = [_HEADER]
    for record in args.records:
        if record.reader and record is not ADMISSION:
            lines.append(_reader(record, args.offset(record)))
    if args.library:
        single = [(k.name, k.violations[0].value) for k in LIMIT_KINDS if len(k.violations) == 1]
        waits = [(k.name, k.handoff.value) for k in LIMIT_KINDS if k.phase is Phase.WAIT]
        by_phase = ", ".join(
            f"{p} = {_lua_list(k.name for k in LIMIT_KINDS if k.phase is p)}" for p in PHASES
        )
        lines += [
            "-- the admission request (admit.lua's arguments; the request a waiting task keeps)",
            f"local R_SIZE = {len(ADMISSION)}",
            _reader(ADMISSION, 0),
            f"local USAGE = {_lua_list(USAGE_FIELDS)}",
            f"local WINDOW_FIELDS = {_lua_list(WINDOW_FIELDS)}",
            _window_reader(),
            _usage_reader(),
            f"local TEMPLATE = {_lua_list(TEMPLATE_FIELDS)}",
            "-- the limit kinds (LIMIT_KINDS): the phases in order, the kinds of each phase in",
            "-- order, the violation of each kind that has one, the hand-off effect of each wait",
            "-- (built when L.load_admission asks for them)",
            "local function limit_kinds()",
            f"  return {_lua_list(PHASES)},",
            f"    {{{by_phase}}},",
            f"    {_lua_map(single)},",
            f"    {_lua_map(waits)}",
            "end",
        ]
    return "\n".join(lines) + "\n"
