"""``govctl audit``: read the newest audit entries, and verify the tenants' sealed chains.

``verify`` walks every chain (one per tenant of the policy, and one for decisions about unknown
tenants) with the deployment's audit key (``GOVERNANCE_AUDIT_KEY``) and names every entry that
was edited, removed, reordered or inserted, an entry without a valid seq, above the counter or
under a stream id ahead of the time, a cut tail, a head trimmed beyond the retention, and a
rollback the maintenance leader recorded: exit code 4. With ``--anchors`` (the checkpoints the
leader exported, signed, outside Redis) it also names a chain rolled back, or wiped, below an
anchored checkpoint; without, it says what it cannot detect.

A key that matches no seal nor mark of the chains (and that the anchors do not confirm) is a
wrong ``GOVERNANCE_AUDIT_KEY``, not tampering: exit code 5 (invalid configuration), saying so.
Where some seals verify under the key (or the anchors were made with it), a chain none of whose
seals verify had them replaced: exit code 4.

``tail`` marks an entry without a valid seal (``NOT SEALED``): a forged one reads as what it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from governance.cli import context, output
from governance.cli.errors import CliError, ExitCode
from governance.cli.output import JsonFlag

if TYPE_CHECKING:
    from governance.settings import GovernanceSettings
    from governance.store.audit_anchor import AnchorSet, AnchorVerifier
    from governance.store.audit_verify import VerifyReport

app = typer.Typer(help="The tamper-evident audit log: tail it, verify its chains.")

#: What each entry type means, as ``audit tail`` shows it (the entry's own ``decision`` field is
#: the policy's verdict at the time, e.g. ``allow`` on a task that later failed: ``--json`` has it).
OUTCOMES = {
    "authorization_denied": "denied",
    "held": "held for approval",
    "approved": "approved",
    "released": "released",
    "rejected": "rejected",
    "expired": "expired",
    "forged_release": "forged release refused",
    "release_expired": "release expired, held again",
    "suggested": "suggested, not run",
    "shadowed": "shadowed, not run",
    "waiting": "waiting",
    "admitted": "admitted",
    "budget_warning": "budget warning",
    "limit_warning": "limit warning",
    "run_closed": "run closed",
    "task_finished": "finished",
    "task_failed": "failed",
    "retry_scheduled": "retry scheduled",
    "task_revoked": "revoked, not run",
    "task_lost": "lost, published again",
    "grant_created": "grant created",
    "grant_revoked": "grant revoked",
    "notify_failed": "notification failed",
    "policy_reloaded": "policy reloaded",
    "policy_invalid": "invalid policy file, kept the old one",
    "audit_rolled_back": "audit chain found cut back",
}

#: What a chain verified without anchors cannot show (said by ``verify``).
CANNOT_DETECT = (
    "without anchors (--anchors FILE), verify cannot detect a rollback: entries cut from the "
    "tail with the counter reset and an older checkpoint put back, or a chain wiped whole "
    "(Redis alone holds a shorter chain, whole in itself); the maintenance leader still logs "
    "one it sees, and records a cut in the chain"
)


def _chains(tenant: str | None) -> list[str]:
    from governance.store.keys import DEPLOYMENT_CHAIN

    runtime = context.runtime()
    policy = runtime.policy
    if tenant is None:
        # Tenants removed from the policy keep their chains: known ones are read too.
        gone = sorted(set(runtime.removed_tenants.known()) - set(policy.tenant_names))
        return [*policy.tenant_names, *gone, DEPLOYMENT_CHAIN]
    if tenant != DEPLOYMENT_CHAIN:
        context.check_tenant(policy, tenant)
    return [tenant]


Tenant = Annotated[
    str | None,
    typer.Option("--tenant", "-t", help="Only this tenant's chain (default: every chain)."),
]


@app.command("tail")
def tail(
    count: Annotated[
        int, typer.Option("-n", "--lines", min=1, max=100_000, help="How many entries.")
    ] = 20,
    tenant: Tenant = None,
    as_json: JsonFlag = False,
) -> None:
    """The newest audit entries, oldest first: when, what happened (denied, held, failed, ...),
    tenant/agent, run, action; the task; the reason. ``--json`` has every field."""
    from governance.integration.worker.maintenance import adoption_allowance_ms
    from governance.store.audit_verify import seal_states

    runtime = context.runtime()
    entries = runtime.audit_log.tail(_chains(tenant), count)
    settings = runtime.settings
    states = seal_states(
        runtime.audit_log,
        settings.audit_key.get_secret_value().encode(),
        entries,
        unsealed_after_ms=round(settings.seal_grace_s * 1000) + adoption_allowance_ms(settings),
    )
    if as_json:
        output.emit_json(
            [{"id": e.id, "chain": e.chain, **e.fields, "seal": states[e.id]} for e in entries]
        )
        return
    output.emit_lines(_entry_lines(e.id, e.fields, states[e.id]) for e in entries)


#: What ``tail`` says under an entry without a valid seal, by its state (see ``seal_states``).
SEAL_NOTES = {
    "altered": "NOT SEALED: its seal does not match: altered (see govctl audit verify)",
    "unsealed": "NOT SEALED: no valid seal: not written by governance (see govctl audit verify)",
    "pending": "(not sealed yet: just written)",
}


def _entry_lines(entry_id: str, f: dict[str, str], seal: str = "sealed") -> list[str]:
    """One entry as a few lines a person reads: when, what happened, to whom; the task; why.

    Each line is wrapped at spaces only (never inside a word: ids, URLs and paths stay whole),
    continuation lines indented.
    """
    ts = int(f["ts"]) if f.get("ts", "").isdigit() else None
    outcome = OUTCOMES.get(f.get("type", ""), f.get("type", "?"))
    if f.get("reviewer"):
        outcome += f" by {f['reviewer']}"
    who = "/".join(x for x in (f.get("tenant", ""), f.get("agent", "")) if x)
    head = [output.when(ts), outcome, who]
    if f.get("run"):
        head.append(f"run {f['run']}")
    if f.get("action"):
        head.append(f.get("action", ""))
    where = [f"task {f['task_id']}"] if f.get("task_id") else []
    where.append(f"entry {entry_id}")
    if f.get("tier"):
        where.append(f"tier {f['tier']}")
    lines = ["  ".join(x for x in head if x), "  " + "  ".join(where)]
    if f.get("reason"):
        lines.append("  " + f["reason"])
    if seal in SEAL_NOTES:
        lines.append("  " + SEAL_NOTES[seal])
    return lines


Anchors = Annotated[
    list[Path] | None,
    typer.Option(
        "--anchors",
        help="Anchor files the maintenance leader wrote (repeat the option, or separate paths "
        "with ':', for several; default: GOVERNANCE_AUDIT_ANCHORS that exist, when "
        "GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY is set). Their signatures are checked with "
        "GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY.",
        dir_okay=False,
    ),
]


@app.command("verify")
def verify(tenant: Tenant = None, anchors: Anchors = None, as_json: JsonFlag = False) -> None:
    """Check every entry's seal and the chain's order, and with anchors that no chain was
    rolled back or wiped; exit 4 naming what was tampered with, 5 for a key that is not the
    chains' key."""
    from governance.integration.worker.maintenance import adoption_allowance_ms
    from governance.store.audit_anchor import read_anchors
    from governance.store.audit_seal import key_id
    from governance.store.audit_verify import verify_all

    runtime = context.runtime()
    settings = runtime.settings
    key = settings.audit_key.get_secret_value().encode()
    paths = _anchor_paths(settings, anchors)
    anchor_set = read_anchors(paths, _anchor_verifier(settings)) if paths is not None else None
    if anchor_set is not None and anchor_set.unverified and not anchor_set.records:
        raise CliError(
            f"none of the {len(anchor_set.unverified)} anchors in {', '.join(anchor_set.files)} "
            "verifies under GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY: it is not the key the workers "
            "anchor with (GOVERNANCE_AUDIT_ANCHOR_KEY_FILE)",
            ExitCode.INVALID_CONFIG,
        )
    chains = _chains(tenant)
    if tenant is None and anchor_set is not None:
        chains += [c for c in anchor_set.chains if c not in chains]
    reports = verify_all(
        runtime.audit_log,
        key,
        chains,
        seal_grace_ms=round(settings.seal_grace_s * 1000),
        adoption_ms=adoption_allowance_ms(settings),
        anchors=anchor_set.records if anchor_set is not None else (),
    )
    mine = key_id(key)
    problem = _key_problem(reports, mine)
    broken = [r for r in reports if not r.ok]
    if as_json:
        output.emit_json(_verify_json(reports, anchor_set, mine, key_mismatch=bool(problem)))
    else:
        _show_verified(reports, anchor_set, mine, broken=bool(broken or problem))
    if problem:
        raise CliError(problem, ExitCode.INVALID_CONFIG)
    if broken:
        lines = [f"chain {r.chain}: {b.reason}" for r in broken for b in r.breaks]
        because = (
            "other chains' do"
            if any(r.macs_ok for r in reports)
            else "the anchors were made with it"
        )
        lines += [
            f"chain {r.chain}: none of its {r.macs_bad} seals and marks verifies under the audit "
            f"key, though {because}: its seals were replaced"
            for r in reports
            if r.key_mismatch
        ]
        raise CliError("audit verification failed:\n" + "\n".join(lines), ExitCode.AUDIT_BROKEN)


def _anchor_paths(settings: GovernanceSettings, given: list[Path] | None) -> list[Path] | None:
    """The anchor files to read: those given (each may hold several paths separated by ':'),
    else the settings' that exist when a public anchor key is set; None: no anchors."""
    from governance.store.audit_anchor import parse_paths

    if given:
        return [p for path in given for p in parse_paths(str(path))]
    if not settings.audit_anchor_public_key:
        return None
    return [p for p in parse_paths(settings.audit_anchors) if p.exists()] or None


def _anchor_verifier(settings: GovernanceSettings) -> AnchorVerifier:
    """The public anchor key: GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY, or the public half of
    GOVERNANCE_AUDIT_ANCHOR_KEY_FILE where it can be read."""
    from governance.store.audit_anchor import AnchorKeyError, AnchorSigner, AnchorVerifier

    try:
        if settings.audit_anchor_public_key:
            return AnchorVerifier.from_text(settings.audit_anchor_public_key)
        if settings.audit_anchor_key_file is not None:
            return AnchorSigner.from_file(settings.audit_anchor_key_file).verifier
    except AnchorKeyError as exc:
        raise CliError(
            f"GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY: {exc}", ExitCode.INVALID_CONFIG
        ) from None
    raise CliError(
        "GOVERNANCE_AUDIT_ANCHOR_PUBLIC_KEY is not set: the anchors' signatures cannot be "
        "checked (set it to the `ed25519:...` public half of the workers' anchor key)",
        ExitCode.INVALID_CONFIG,
    )


def _key_problem(reports: list[VerifyReport], mine: str) -> str:
    """Why the audit key is not the chains' key, or "": no seal or mark verifies under it while
    some do not, and the anchors do not say it is (or they say it is not)."""
    if any(r.macs_ok for r in reports) or any(mine in r.anchor_keys for r in reports):
        return ""
    others = sorted({k for r in reports for k in r.anchor_keys} - {mine})
    bad = sum(r.macs_bad for r in reports)
    if not bad and not others:
        return ""
    said = [
        "GOVERNANCE_AUDIT_KEY does not match the key the audit chains were sealed with: "
        + (f"none of their {bad} seals and marks verifies under it" if bad else "")
        + ("; " if bad and others else "")
        + (f"the anchors were made with audit key id {', '.join(others)}" if others else ""),
        f"(this key's id is {mine}). Run verify with the deployment's GOVERNANCE_AUDIT_KEY.",
    ]
    if not others:
        said.append(
            "If it is the deployment's key, every seal was replaced: tampering "
            "(anchors, --anchors, would tell the two apart)."
        )
    return "\n".join(said)


def _verify_json(
    reports: list[VerifyReport], anchors: AnchorSet | None, mine: str, *, key_mismatch: bool
) -> dict[str, Any]:
    return {
        "ok": not key_mismatch and all(r.ok for r in reports),
        "key_mismatch": key_mismatch,
        "key_id": mine,
        "anchors": None
        if anchors is None
        else {
            "files": anchors.files,
            "checked": sum(r.anchored for r in reports),
            "other_keys": sorted({k for r in reports for k in r.anchor_keys} - {mine}),
            "unverified": anchors.unverified,
            "torn": anchors.torn,
        },
        "cannot_detect": [CANNOT_DETECT] if anchors is None else [],
        "chains": [
            {
                "chain": r.chain,
                "ok": r.ok,
                "checked": r.checked,
                "pending": r.pending,
                "adopted": r.adopted,
                "anchored": r.anchored,
                "macs_ok": r.macs_ok,
                "macs_bad": r.macs_bad,
                "breaks": [{"entry": b.entry, "reason": b.reason} for b in r.breaks],
            }
            for r in reports
        ],
    }


def _show_verified(
    reports: list[VerifyReport], anchors: AnchorSet | None, mine: str, *, broken: bool
) -> None:
    """What verify says on stdout: the count when all is well, then the anchors (or what it
    cannot detect without them)."""
    if not broken:
        checked = sum(r.checked for r in reports)
        pending = sum(r.pending for r in reports)
        note = f", {pending} just written and not sealed yet" if pending else ""
        output.show(f"audit chains ok: {checked} entries verified in {len(reports)} chains{note}")
    if anchors is None:
        output.show(CANNOT_DETECT)
        return
    anchored = sum(r.anchored for r in reports)
    files = os.pathsep.join(anchors.files)
    output.show(f"anchors: {anchored} checkpoints compared, from {files}")
    others = sorted({k for r in reports for k in r.anchor_keys} - {mine})
    if others:
        output.show(f"anchors: some were made with another audit key (id {', '.join(others)})")
    for problem in anchors.unverified:
        output.show(f"anchors: not counted: {problem}")
    for where in anchors.torn:
        output.show(f"anchors: not counted: {where}: not a note (a write torn by a crash?)")
