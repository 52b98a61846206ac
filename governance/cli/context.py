"""What a govctl command needs, loaded only when it asks: settings, policy, Celery app, runtime.

``govctl --help`` and ``govctl policy check`` import neither Celery nor redis and connect
nowhere; commands that touch state import the deployment's Celery app (``GOVERNANCE_APP``,
``module:attr``) and use the governance runtime installed on it, so govctl sees exactly the
settings and policy the workers see.

No silent wrong answers:

- **The state Redis must be a deployment's.** Workers mark the state Redis they use
  (:mod:`governance.store.deployment`); a command refuses a Redis without the mark (exit 5),
  naming ``GOVERNANCE_STATE_REDIS_URL`` and the URL it read, instead of answering from an empty
  database (the broker's database 0, when the variable was left unset).
- **An invalid policy file does not lock operators out.** Every process that loads a valid file
  keeps a copy of it beside it (:func:`~governance.integration.policy_watch.last_valid_path`);
  while the file is invalid, the commands that read state and decide held tasks use that copy,
  the version the running workers still enforce, and say so on stderr with the file's error.
  Reviewer keys come from a policy file only, never from the state Redis.
- **A policy file that is not there** names ``GOVERNANCE_CONFIG_PATH`` and its default.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.cli.errors import CliError, ExitCode

if TYPE_CHECKING:
    from governance.integration.approvals.reviewers import Reviewers
    from governance.integration.runtime import GovernanceRuntime
    from governance.policy.engine import Policy
    from governance.policy.loader import ConfigError
    from governance.settings import GovernanceSettings
    from governance.store.state import StateStore

CONFIG_PATH_VARIABLE = "GOVERNANCE_CONFIG_PATH"
STATE_URL_VARIABLE = "GOVERNANCE_STATE_REDIS_URL"


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

    An invalid file raises :class:`~governance.policy.loader.ConfigError` (exit code 5); a
    configured file that is not there says which variable names it.
    """
    from governance.policy.engine import Policy
    from governance.policy.loader import ConfigError

    if path is not None:
        return Policy.from_file(path)
    configured = settings().config_path
    try:
        return Policy.from_file(configured)
    except ConfigError as exc:
        raise _named(exc, configured) from None


def _named(exc: ConfigError, configured: Path) -> Exception:
    """``exc``, or, when the configured file is simply not there, an error that names the
    variable (and its default, when it was left unset) and where a relative path is read."""
    if exc.errors != [("", "file not found")] or exc.source != str(configured):
        return exc
    value = os.environ.get(CONFIG_PATH_VARIABLE)
    how = (
        f"{CONFIG_PATH_VARIABLE}={value}"
        if value
        else f"{CONFIG_PATH_VARIABLE} is unset, and its default is {configured}"
    )
    where = "" if configured.is_absolute() else f", relative to {os.getcwd()}"
    return CliError(
        f"{configured}: file not found ({how}{where}): set {CONFIG_PATH_VARIABLE} to the "
        "policy file your workers load",
        ExitCode.INVALID_CONFIG,
    )


def _policy_file_or_last_valid() -> None:
    """Before the deployment's app loads the configured policy file: when the file is invalid,
    point ``GOVERNANCE_CONFIG_PATH`` at the copy of its last valid version (the version the
    running workers still enforce), and say so; without a copy, the file's errors (exit 5)."""
    from governance.integration.policy_watch import is_last_valid_copy, last_valid_path
    from governance.policy.engine import Policy
    from governance.policy.loader import ConfigError

    configured = settings().config_path
    if is_last_valid_copy(configured):
        return
    try:
        Policy.from_file(configured)
        return
    except ConfigError as exc:
        problem = _named(exc, configured)
        if not isinstance(problem, ConfigError):
            raise problem from None
        error = str(exc)
        copy = last_valid_path(configured)
        try:
            fallback = Policy.from_file(copy)
        except ConfigError:
            raise CliError(
                f"{error}\n(no last valid version to fall back on: {copy} "
                + ("is not valid either)" if copy.exists() else "does not exist)"),
                ExitCode.INVALID_CONFIG,
            ) from None
    from governance.cli import output

    saved = output.when(round(copy.stat().st_mtime * 1000))
    output.warn(
        f"the policy file {configured} is invalid; govctl uses its last valid version "
        f"{fallback.version} (kept in {copy}, saved {saved}), which running workers keep "
        f"enforcing until the file is fixed:\n{error}"
    )
    os.environ[CONFIG_PATH_VARIABLE] = str(copy)
    settings.cache_clear()


def check_tenant(policy: Policy, tenant: str | None) -> None:
    """Refuse (exit 1) a ``--tenant`` the policy does not configure, naming those it does:
    every command that takes a tenant says the same."""
    if tenant is not None and policy.tenant(tenant) is None:
        known = ", ".join(policy.tenant_names) or "none"
        raise CliError(f"unknown tenant {tenant!r} (configured: {known})", ExitCode.REFUSED)


@cache
def celery_app() -> Any:
    """The deployment's Celery app, imported from ``GOVERNANCE_APP`` (``module:attr``), with
    the policy file or, while it is invalid, its last valid version."""
    _policy_file_or_last_valid()
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
        found = runtime_for(app)
    except RuntimeError as exc:
        raise CliError(str(exc), ExitCode.INVALID_CONFIG) from None
    check_deployment(found.state, found.settings)
    return found


def check_deployment(state: StateStore, config: GovernanceSettings) -> None:
    """Refuse a state Redis that no worker ever marked as its deployment's (exit 5), naming
    ``GOVERNANCE_STATE_REDIS_URL`` and the URL read. A Redis that does not answer is left to
    the command (exit 3 when it needs it). Workers refresh the mark every few seconds, so a
    missing one is waited for that long first (a state flushed a moment ago)."""
    from governance.integration.worker.marker import refresh_s
    from governance.store.deployment import read_marker
    from governance.store.errors import StoreUnavailable

    deadline = time.monotonic() + refresh_s(config) + 0.5
    try:
        while read_marker(state) is None:
            if time.monotonic() >= deadline:
                raise CliError(_not_a_deployment(config), ExitCode.INVALID_CONFIG)
            time.sleep(0.1)
    except StoreUnavailable:
        return


def _not_a_deployment(config: GovernanceSettings) -> str:
    url = shown_url(config.state_url)
    if config.state_sentinels:
        read = (
            f"the primary GOVERNANCE_STATE_SENTINELS={config.state_sentinels} name "
            f"{config.state_sentinel_master!r}"
        )
    elif config.state_redis_url:
        read = f"{STATE_URL_VARIABLE}={url}"
    else:
        read = (
            f"{url} ({STATE_URL_VARIABLE} is unset, so govctl reads the broker's Redis, "
            "GOVERNANCE_BROKER_URL)"
        )
    return (
        f"the Redis govctl reads, {read}, holds no governance deployment: no worker has ever "
        f"run with it as its state Redis. Set {STATE_URL_VARIABLE} to the URL your workers use "
        "(`make redis` prints it), or start a worker first"
    )


def shown_url(url: str) -> str:
    """A Redis URL as govctl prints it: its password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


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
