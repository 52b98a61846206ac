"""What a govctl command needs, loaded only when it asks: settings, policy, Celery app, runtime.

``govctl --help`` and ``govctl policy check`` import neither Celery nor redis and connect
nowhere; commands that touch state import the deployment's Celery app (``GOVERNANCE_APP``,
``module:attr``) and use the governance runtime installed on it, so govctl sees exactly the
settings and policy the workers see.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.cli.errors import CliError, ExitCode

if TYPE_CHECKING:
    from governance.integration.approvals.reviewers import Reviewers
    from governance.integration.runtime import GovernanceRuntime
    from governance.policy.engine import Policy
    from governance.settings import GovernanceSettings


@cache
def settings() -> GovernanceSettings:
    """The deployment settings from ``GOVERNANCE_*`` environment variables."""
    from pydantic import ValidationError

    from governance.settings import GovernanceSettings

    try:
        return GovernanceSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"GOVERNANCE_{'_'.join(str(p) for p in e['loc']).upper() or 'SETTINGS'}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors(include_url=False)
        )
        raise CliError(f"invalid settings: {problems}", ExitCode.INVALID_CONFIG) from None


def load_policy(path: Path | None = None) -> Policy:
    """The policy at ``path`` (default: the configured ``GOVERNANCE_CONFIG_PATH``), no Redis.

    An invalid file raises :class:`~governance.policy.loader.ConfigError` (exit code 5).
    """
    from governance.policy.engine import Policy

    return Policy.from_file(path if path is not None else settings().config_path)


def check_tenant(policy: Policy, tenant: str | None) -> None:
    """Refuse (exit 1) a ``--tenant`` the policy does not configure, naming those it does:
    every command that takes a tenant says the same."""
    if tenant is not None and policy.tenant(tenant) is None:
        known = ", ".join(policy.tenant_names) or "none"
        raise CliError(f"unknown tenant {tenant!r} (configured: {known})", ExitCode.REFUSED)


@cache
def celery_app() -> Any:
    """The deployment's Celery app, imported from ``GOVERNANCE_APP`` (``module:attr``)."""
    spec = settings().app
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(
            f"GOVERNANCE_APP must be 'module:attribute', got {spec!r}", ExitCode.INVALID_CONFIG
        )
    named = f"{spec!r} (GOVERNANCE_APP)"
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # like `celery -A`, find a deployment module in the cwd
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        # An app refuses to be created with an invalid policy: report the policy's own errors.
        load_policy()
        raise CliError(
            f"cannot load the Celery app {named}: {exc.code}", ExitCode.INVALID_CONFIG
        ) from None
    except ImportError as exc:
        raise CliError(
            f"cannot import the Celery app {named}: {exc}; set GOVERNANCE_APP to your app's "
            "module:attribute (as `celery -A` takes it), from the directory that holds it",
            ExitCode.INVALID_CONFIG,
        ) from None
    app = getattr(module, attr, None)
    if app is None:
        raise CliError(
            f"module {module_name!r} has no attribute {attr!r} (GOVERNANCE_APP={spec!r})",
            ExitCode.INVALID_CONFIG,
        )
    return app


@cache
def runtime() -> GovernanceRuntime:
    """The governance runtime installed on the deployment's app (its settings and policy).

    An app governed by its task class alone (``Celery(task_cls=GovernedTask)``) is governed
    when its tasks are bound to it, which Celery does when the app is finalized: a worker does
    it at start, and so does govctl here.
    """
    from governance.integration.runtime import installed_on, runtime_for

    app = celery_app()
    if installed_on(app) is None:
        app.finalize(auto=True)
    try:
        return runtime_for(app)
    except RuntimeError as exc:
        raise CliError(str(exc), ExitCode.INVALID_CONFIG) from None


@cache
def reviewers() -> Reviewers:
    """The reviewers' workflow on the deployment's app (held tasks, decisions, grants)."""
    from governance.integration.approvals.reviewers import Reviewers

    return Reviewers(celery_app(), runtime())


def operator() -> str:
    """Who runs this command, for the audit of operator actions (the OS user name)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
