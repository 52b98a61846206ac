"""``govctl reviewers``: make a reviewer's key pair; list a tenant's reviewers.

A reviewer signs every decision with an Ed25519 private key that only they hold; the policy lists
the public half under the tenant's ``reviewers``. ``keygen`` writes the private key (mode 0600)
and prints the line to paste into the policy. Nobody else, not even whoever can write Redis or
the broker, can sign a decision in that reviewer's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from governance.cli import context, output
from governance.cli.errors import CliError
from governance.cli.output import JsonFlag, TenantFilter

app = typer.Typer(
    help="Reviewers' signing keys: make one, list who may decide.", no_args_is_help=True
)


@app.command("keygen")
def keygen(
    name: Annotated[str, typer.Argument(help="The reviewer's name, as the policy will list it.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the private key (default: ./NAME.key).",
            dir_okay=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a new private key (mode 0600) and print the policy line with its public key."""
    from governance.policy.context import validate_identifier
    from governance.policy.signing import new_private_key, private_key_pem, public_key_text

    try:
        validate_identifier(name)
    except ValueError as exc:
        raise typer.BadParameter(f"{name!r}: {exc}", param_hint="NAME") from None
    path = out or Path(f"{name}.key")
    if path.exists() and not force:
        raise CliError(f"{path} exists: pass --force to overwrite it")
    key = new_private_key()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    os.chmod(path, 0o600)
    output.note(f"wrote the private key of {name} to {path} (mode 0600): keep it to yourself")
    output.note("add this line under the tenant's `reviewers:` in the policy file:")
    output.emit_line(f"{name}: {public_key_text(key.public_key())}")


@app.command("list")
def list_(
    tenant: TenantFilter = None,
    as_json: JsonFlag = False,
) -> None:
    """The reviewers of each tenant, with their public keys and the approval rules."""
    from governance.policy.signing import public_key_text

    policy = context.load_policy()
    context.check_tenant(policy, tenant)
    names = [tenant] if tenant else list(policy.tenant_names)
    rows = []
    for name in names:
        tp = policy.tenant(name)
        assert tp is not None
        for reviewer, key in tp.reviewers.items():
            rows.append(
                {
                    "tenant": name,
                    "reviewer": reviewer,
                    "key": public_key_text(key),
                    "quorum": tp.approval.quorum,
                    "allow_self_approval": tp.approval.allow_self_approval,
                }
            )
    if as_json:
        output.emit_json(rows)
        return
    shown = output.table("tenant", "reviewer", "public key", "quorum", title="reviewers")
    for row in rows:
        output.add_row(shown, row["tenant"], row["reviewer"], row["key"], row["quorum"])
    output.show(shown)
