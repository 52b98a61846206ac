"""The vocabulary shared with the Lua scripts: declared once, checked when a script is loaded."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

import governance.store
from governance.policy.limits import ViolationType
from governance.store import StateStore
from governance.store.admission import AdmissionStatus, Admitter
from governance.store.audit import TEMPLATE_FIELDS, AuditEventType
from governance.store.keys import TenantKeys
from governance.store.limits import BUDGET_KINDS, AdmissionLimits, BudgetCheck
from governance.store.lua import SCRIPT_NAMES, script_source
from governance.store.pending import Pending
from governance.store.vocabulary import (
    ADMISSION,
    ADMISSION_LIMITS_PART,
    ADMISSION_TASK_PART,
    LIMIT_KINDS,
    PHASES,
    SCRIPT_ARGS,
    SETTLEMENT,
    SETTLEMENT_LIMITS_PART,
    SETTLEMENT_TASK_PART,
    SWEEP,
    Handoff,
    Phase,
    limit_values,
    resolve_names,
)
from tests.store.helpers import TOOL_STEP, ctx, envelope, tool


def _lua(name: str) -> str:
    return resources.files("governance.store.scripts").joinpath(f"{name}.lua").read_text()


def test_every_script_loads_with_its_names_resolved() -> None:
    for name in SCRIPT_NAMES:
        source = script_source(name)
        code = "\n".join(line.split("--", 1)[0] for line in source.split("\n"))
        assert not re.search(r"(?<![\w.])(F|R|AT|V)\.[a-z_]", code), name


def test_an_undeclared_name_is_refused_when_the_script_is_loaded() -> None:
    with pytest.raises(ValueError, match=r"F\.no_such_field"):
        resolve_names("admit", "local x = ARGV[F.no_such_field]")
    with pytest.raises(ValueError, match=r"AT\.no_such_type"):
        resolve_names("settle", "local t = AT.no_such_type")
    # A comment may name what another script declares.
    assert resolve_names("renew", "-- F.seals") == "-- F.seals"


def test_no_audit_type_is_a_literal_of_the_scripts() -> None:
    for name in ("lib", *SCRIPT_NAMES):
        code = "\n".join(line.split("--", 1)[0] for line in _lua(name).split("\n"))
        assert not re.search(r"type\s*=\s*'", code), name
        # task_entry(written, now, template, TYPE, ...): the type is always AT.<name>.
        for call in re.finditer(r"L\.task_entry\(([^,]*,){3}\s*([^,]*)", code):
            assert "'" not in call.group(2).replace("AT.held or AT.suggested", ""), call.group(0)
    types = {t.value for t in AuditEventType}
    assert {"admitted", "waiting", "task_failed", "budget_warning", "limit_warning"} <= types


def test_the_admission_request_is_the_task_the_template_and_the_limits_in_that_order() -> None:
    assert len(ADMISSION) == len(ADMISSION_TASK_PART) + len(TEMPLATE_FIELDS) + len(
        ADMISSION_LIMITS_PART
    )
    assert ADMISSION.names[: len(ADMISSION_TASK_PART)] == ADMISSION_TASK_PART.names
    assert ADMISSION.names[-len(ADMISSION_LIMITS_PART) :] == ADMISSION_LIMITS_PART.names
    assert SETTLEMENT.names == (
        *SETTLEMENT_TASK_PART.names,
        *(f"au_{f}" for f in TEMPLATE_FIELDS),
        *SETTLEMENT_LIMITS_PART.names,
    )
    # Each script's request comes first: read_request(ARGV) reads admit.lua's arguments.
    assert SCRIPT_ARGS["admit"].records[0] is ADMISSION
    assert SCRIPT_ARGS["settle"].records[0] is SETTLEMENT


def test_every_limit_kind_declares_its_phase_hand_off_and_fields() -> None:
    assert [k.phase for k in LIMIT_KINDS] == sorted(
        (k.phase for k in LIMIT_KINDS), key=PHASES.index
    )
    waits = {k.name: k.handoff for k in LIMIT_KINDS if k.phase is Phase.WAIT}
    assert waits == {
        "paused": Handoff.STOP,
        "budget_in_flight": Handoff.SKIP,
        "concurrency": Handoff.STOP,
        "run_concurrency": Handoff.PASS,
    }
    assert all(k.handoff is Handoff.PUBLISH for k in LIMIT_KINDS if k.phase is not Phase.WAIT)
    for kind in LIMIT_KINDS:
        assert kind.violations
        assert all(isinstance(v, ViolationType) for v in kind.violations)
        for item in kind.fields:
            assert item.name in ADMISSION.positions or item.name in ADMISSION.groups
    # A check function per kind in lib.lua.
    lib = _lua("lib")
    for kind in LIMIT_KINDS:
        assert f"function C.{kind.name}(x)" in lib, kind.name


def test_the_limits_part_has_a_value_per_field() -> None:
    limits = AdmissionLimits(
        concurrency=3, budget_checks=(BudgetCheck(governance.store.Period.DAY, "tokens", 9),)
    )
    values = limit_values(limits, [1, 2, 3, 4])
    assert len(values) == len(ADMISSION_LIMITS_PART)
    by_name = dict(zip(ADMISSION_LIMITS_PART.names, values, strict=True))
    assert by_name["concurrency"] == 3
    assert by_name["run_concurrency"] == ""  # none
    assert by_name["reserve_day"] == "1"
    assert by_name["reserve_run"] == ""
    assert json.loads(str(by_name["checks"])) == [[2, 9, 3, 4, "token_limit"]]
    assert BUDGET_KINDS["tokens"] is ViolationType.token_limit


def test_arguments_are_arranged_by_name_and_checked() -> None:
    given = {"close": ("t", "r", "by"), "policy_version": "v", "pool_gated": "1"}
    assert SWEEP.arrange(given) == ["t", "r", "by", "v", "1"]
    with pytest.raises(ValueError, match="missing"):
        SWEEP.arrange({"close": ("t", "r", "by"), "policy_version": "v"})
    with pytest.raises(ValueError, match="unknown"):
        SWEEP.arrange({**given, "extra": 1})
    with pytest.raises(ValueError, match="close"):
        SWEEP.arrange({**given, "close": ("t", "r")})
    with pytest.raises(ValueError, match="5 values"):
        SWEEP.args(close=("t", "r"), policy_version="", pool_gated="")


def test_an_audit_template_with_an_undeclared_field_is_refused(admitter: Admitter) -> None:
    with pytest.raises(ValueError, match="audit template"):
        admitter.admit(
            ctx=ctx(),
            action=tool(),
            task_id="t",
            attempt=0,
            estimate=TOOL_STEP,
            limits=AdmissionLimits(),
            template={"tenant": "acme", "colour": "blue"},
        )


def test_a_request_kept_by_the_earlier_version_is_published_for_its_delivery_to_decide(
    state: StateStore, admitter: Admitter
) -> None:
    """A task that began to wait before the upgrade keeps its request as one JSON object with
    short keys: the hand-off publishes it without a token, and its own delivery decides."""
    one = AdmissionLimits(concurrency=1)
    running = admitter.admit(
        ctx=ctx(), action=tool(), task_id="running", attempt=0, estimate=TOOL_STEP, limits=one
    )
    assert running.admitted
    keys = TenantKeys("acme")
    record = keys.task("old")
    state.client.hset(
        record,
        mapping={
            "id": "old",
            "attempt": 0,
            "where": "waiting",
            "wait_since": 1,
            "wait_seq": 1,
            "msg": envelope("old"),
            "req": json.dumps({"id": "old", "a": 0, "conc": 1, "max_wait": 3_600_000}),
        },
    )
    state.client.zadd(keys.waiting, {record: 1})
    settlement = admitter.settle(running.ticket, TOOL_STEP)
    assert [(p.task_id, p.handoff) for p in settlement.publish] == [("old", None)]
    again = admitter.admit(
        ctx=ctx(),
        action=tool(),
        task_id="old",
        attempt=0,
        estimate=TOOL_STEP,
        limits=one,
        envelope=envelope("old"),
    )
    assert again.status is AdmissionStatus.ADMITTED


def test_a_pending_answer_is_read_once() -> None:
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return 41

    pending = Pending(read).then(lambda value: value + 1)
    assert pending.result() == 42
    assert pending.result() == 42
    assert reads == [1]

    def fail() -> int:
        raise RuntimeError("gone")

    failed = Pending(fail)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="gone"):
            failed.result()
    assert Pending.ready("x").result() == "x"


def test_the_package_exports_what_a_user_needs_and_keeps_the_rest_importable() -> None:
    assert set(governance.store.__all__) == {
        "AuditEntry",
        "AuditEvent",
        "AuditEventType",
        "AuditLog",
        "Period",
        "StateStore",
        "StoreUnavailable",
        "UsageSnapshot",
        "VerifyReport",
        "connect",
        "read_usage",
        "verify",
    }
    from governance.store import Admitter as Moved  # kept importable for one release
    from governance.store.admission import Admitter as Home

    assert Moved is Home
    with pytest.raises(AttributeError):
        governance.store.NoSuchName  # noqa: B018
