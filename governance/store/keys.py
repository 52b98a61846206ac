"""Every Redis key the governance layer uses, named in one place.

All keys of one tenant carry the tenant as a hash tag (``gov:{tenant}:...``), so every Lua script,
which only ever touches the keys of one tenant, runs unchanged on Redis Cluster: admission, the
wait list, the ledger and the audit chain of a tenant share its slot, and tenants spread over the
cluster. Nothing else in the code base builds a key string.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime
from enum import StrEnum

PREFIX = "gov"


class Period(StrEnum):
    """A budget/usage window: one agent run, a UTC calendar day, or a UTC calendar month."""

    RUN = "run"
    DAY = "day"
    MONTH = "month"


#: Window order used by the Lua scripts (1-based in Lua): run, day, month.
WINDOW_ORDER: tuple[Period, ...] = (Period.RUN, Period.DAY, Period.MONTH)


def period_label(period: Period, run: str, now: datetime | None = None) -> str:
    """The label of the window that ``now`` falls in: the run id, ``2026-11-21`` or ``2026-11``."""
    if period is Period.RUN:
        return run
    if now is None:
        day, month = _today()
        return day if period is Period.DAY else month
    moment = now.astimezone(UTC)
    return moment.strftime("%Y-%m-%d") if period is Period.DAY else moment.strftime("%Y-%m")


_DAY_S = 86_400
#: The UTC day number and its day and month labels, as last computed (every admission asks).
_today_labels: tuple[int, str, str] = (-1, "", "")


def _today() -> tuple[str, str]:
    """Today's day and month labels (UTC), formatted once per day, not once per task."""
    global _today_labels
    day_number = int(time.time() // _DAY_S)
    cached = _today_labels
    if cached[0] != day_number:
        moment = datetime.fromtimestamp(day_number * _DAY_S, UTC)
        cached = (day_number, moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m"))
        _today_labels = cached
    return cached[1], cached[2]


#: The audit chain of decisions that belong to no configured tenant (an unknown tenant's name is
#: never used as a key). Tenant names start with a letter or a digit, so it cannot collide.
DEPLOYMENT_CHAIN = "_deployment"


class TenantKeys:
    """Key names for one tenant; every one of them hashes to the tenant's cluster slot."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self._base = f"{PREFIX}:{{{tenant}}}"

    @property
    def leases(self) -> str:
        """Sorted set of running (or handed-on) tasks: member = record key, score = lease
        expiry (ms). A task's reservation is kept in its record and follows its lease."""
        return f"{self._base}:leases"

    @property
    def waiting(self) -> str:
        """Sorted set: the tenant's FIFO wait list, member = record key, score = wait position."""
        return f"{self._base}:waiting"

    @property
    def ledger(self) -> str:
        """Sorted set of tasks not yet done: member = record key, score = when the reconciler
        must look at the task again (ms)."""
        return f"{self._base}:ledger"

    @property
    def meta(self) -> str:
        """Hash of the tenant's counters (the wait-list position, the audit sequence, worker
        time per minute ``busy:<minute>``) and of what operators set on it at run time, read by
        the scripts (``CONTROL_FIELDS``: paused, a concurrency and a weight until a time), and,
        while the tenant is not in the policy, ``REMOVED_FIELDS``."""
        return f"{self._base}:meta"

    @property
    def audit(self) -> str:
        """Stream: the tenant's audit chain (entries, and the seals that authenticate them)."""
        return f"{self._base}:audit"

    @property
    def audit_marks(self) -> str:
        """Hash of signed marks on the audit chain: the newest checkpoint and trim record."""
        return f"{self._base}:audit-marks"

    @property
    def runs(self) -> str:
        """Sorted set of the tenant's runs in flight: member = run id, score = idle deadline."""
        return f"{self._base}:runs"

    @property
    def barrier(self) -> str:
        """String: a counter the durability confirmation increments (``store.durability``), so
        that its ``WAITAOF``/``WAIT`` waits for a write of its own on the tenant's node."""
        return f"{self._base}:barrier"

    def shared(self) -> list[str]:
        """The keys every admission, settlement and sweep script takes first (KEYS[1..7])."""
        return [
            self.leases,
            self.waiting,
            self.ledger,
            self.meta,
            self.audit,
            self.tenant_rate,
            self.runs,
        ]

    def task(self, task_id: str) -> str:
        """Hash: the ledger record of one task (where it is, since when, its message, its
        admission state per attempt)."""
        return f"{self._base}:task:{task_id}"

    @property
    def tenant_rate(self) -> str:
        """GCRA theoretical arrival time of the tenant-wide rate limit."""
        return f"{self._base}:rate"

    def provider_rate(self, provider: str) -> str:
        """GCRA theoretical arrival time of the tenant's rate limit for one provider."""
        return f"{self._base}:rate:provider:{provider}"

    def cooldown(self, provider: str) -> str:
        """Time (ms) until which the provider must not be called for this tenant (Retry-After)."""
        return f"{self._base}:cooldown:{provider}"

    @property
    def placeholder(self) -> str:
        """A key in the tenant's slot passed where a script needs no real key (never written)."""
        return f"{self._base}:unused"

    def window(self, period: Period, label: str) -> str:
        """Hash of one usage window: what was used, and what tasks in flight reserved (r_*)."""
        return f"{self._base}:usage:{period.value}:{label}"

    def windows(self, run: str, now: datetime | None = None) -> list[str]:
        """The run, day and month windows that a task of ``run`` counts in at ``now``."""
        return [self.window(p, period_label(p, run, now)) for p in WINDOW_ORDER]

    def held(self, task_id: str) -> str:
        """Hash of one held (approval-tier) or suggested task: the call, its status, decisions."""
        return f"{self._base}:held:{task_id}"

    def held_by_status(self, status: str) -> str:
        """Sorted set of the tenant's held tasks in one status, scored by request time (ms)."""
        return f"{self._base}:held-status:{status}"

    @property
    def outbox(self) -> str:
        """Sorted set of notifications to send to reviewers: id -> when to try next (ms)."""
        return f"{self._base}:outbox"

    @property
    def notifications(self) -> str:
        """Hash of notifications not sent yet: id -> JSON (body, attempts)."""
        return f"{self._base}:notifications"

    @property
    def held_expiry(self) -> str:
        """Sorted set of the tenant's tasks still held, scored by expiry time (ms)."""
        return f"{self._base}:held-expiry"

    @property
    def grants(self) -> str:
        """Hash of grants given by a quorum of reviewers: grant id -> grant with the signed
        approvals that justify it (JSON)."""
        return f"{self._base}:grants"

    @property
    def queued(self) -> str:
        """Sorted set of the tenant's tasks published to the broker and not yet received by a
        worker: member = record key, score = when published (ms). With the leases, what the
        publisher counts against the tenant's concurrency."""
        return f"{self._base}:queued"

    def step_repetitions(self, run: str) -> str:
        """Hash of a run: input hash of a step -> how many times that exact step was admitted."""
        return f"{self._base}:steps:{run}"


class ProviderKeys:
    """Keys of an LLM provider shared by the whole deployment (``scope: deployment``): its
    cooldown and its rate, in a cluster slot of their own (``gov:{provider:NAME}:...``), so
    they are touched by a script of their own, before the tenant's admission."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._base = f"{PREFIX}:{{provider:{provider}}}"

    @property
    def cooldown(self) -> str:
        """STRING: until when (ms) every tenant's calls wait (a shared Retry-After)."""
        return f"{self._base}:cooldown"

    @property
    def rate(self) -> str:
        """STRING: the provider-wide GCRA theoretical arrival time (ms)."""
        return f"{self._base}:rate"


#: The fields of a tenant's meta hash that operators set (govctl tenants pause, govctl limits
#: override): whether it is paused, and a concurrency and a weight in force until a time (ms).
CONTROL_FIELDS = (
    "ctl_paused",
    "ctl_concurrency",
    "ctl_concurrency_until",
    "ctl_weight",
    "ctl_weight_until",
)

#: The fields of a tenant's meta hash while it has open tasks and is no longer in the policy
#: (removed_tenant.lua): when that was noticed and when its tasks end (ms).
REMOVED_FIELDS = ("removed_at", "removed_deadline")

_PLAIN_QUEUE = re.compile(r"[A-Za-z0-9._:@-]{1,120}")


def queue_tag(queue: str) -> str:
    """A queue's name as it appears in its pool's hash tag: itself when plain, else a digest
    (so no name can break the tag)."""
    if _PLAIN_QUEUE.fullmatch(queue):
        return queue
    return "h-" + hashlib.sha256(queue.encode()).hexdigest()[:24]


class PoolKeys:
    """The worker pool of one queue: its capacity and its fair-share state, in a cluster slot of
    its own (``gov:{pool:QUEUE}:...``). It holds scheduling state only, never a task: tasks live
    in their tenants' slots, and a script touches either the pool or one tenant."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._base = f"{PREFIX}:{{pool:{queue_tag(queue)}}}"

    @property
    def workers(self) -> str:
        """Hash: worker node -> "<pool size>:<expires ms>" (its heartbeat)."""
        return f"{self._base}:workers"

    @property
    def ready(self) -> str:
        """Sorted set of tenants with tasks waiting for the pool: tenant -> start tag."""
        return f"{self._base}:ready"

    @property
    def tenants(self) -> str:
        """Hash: "<tenant>:<field>" -> value, per tenant: finish tag (f), weight (w), running
        means of run time (ms) and cost (c)."""
        return f"{self._base}:tenants"

    @property
    def grants(self) -> str:
        """Sorted set of dispatches in flight: grant token -> backstop expiry (ms)."""
        return f"{self._base}:grants"

    @property
    def grant_info(self) -> str:
        """Hash: grant token -> "<tenant>|<estimated cost>"."""
        return f"{self._base}:grant-info"

    @property
    def state(self) -> str:
        """Hash: vtime (the pool's virtual time), saturated (1 while tenants wait for it),
        seq (grant counter)."""
        return f"{self._base}:state"

    def all(self) -> list[str]:
        """Every key of the pool, in the order pool_dispatch.lua takes them."""
        return [self.workers, self.ready, self.tenants, self.grants, self.grant_info, self.state]


class DeploymentKeys:
    """Keys shared by the whole deployment, each with its own hash tag; none is on the path of a
    governed task."""

    #: Which worker runs the reconciler, the audit checkpoints and the held-task sweep right now.
    maintenance_leader = f"{PREFIX}:{{maintenance}}:leader"
    #: What each worker enforces: node name -> JSON (policy version, loaded at, error, seen at).
    policy_reports = f"{PREFIX}:{{policy}}:workers"
    #: That this Redis holds a deployment's governance state: JSON (which worker wrote it
    #: first and last, and when), written by workers as they start and while they run. govctl
    #: refuses to answer from a Redis without it (say, the broker's database 0).
    marker = f"{PREFIX}:{{deployment}}:marker"
    #: Every tenant a worker's policy named: name -> its max_wait (ms), written when a worker
    #: loads a policy. Only such tenants can have state (an unknown tenant's name never
    #: becomes a key), so the maintenance finds a tenant removed from the policy here.
    known_tenants = f"{PREFIX}:{{tenants}}:known"
    #: The tenants marked removed (their open tasks end after a grace): a set.
    removed_tenants = f"{PREFIX}:{{tenants}}:removed"
    #: That task events are on: a string (the node of the worker that wrote it last) that each
    #: worker whose events are on writes again every second or so, expiring when its events
    #: end (a monitor stopped asking). Publishers and govctl send their events only while it
    #: exists (see ``integration.monitor``).
    events_on = f"{PREFIX}:{{events}}:on"
