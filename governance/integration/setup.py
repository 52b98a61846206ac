"""Governing a Celery app: one call (:func:`govern`), or none at all with ``task_cls``.

``govern(app)`` loads the settings (``GOVERNANCE_*`` variables) and the policy file they name,
applies the few Celery settings governance relies on (:func:`celery_conf`) and installs the
runtime (:func:`install`: publishing through the publisher wing, the worker's signal handlers).
An app created with ``Celery(..., task_cls=GovernedTask)`` (or with any task based on
:class:`~governance.integration.worker.task.GovernedTask`) is governed from the environment the
moment its first governed task is bound to it, unless ``govern`` or ``install`` was called first.

This is the roof of the integration layer: the only module that imports both wings.
"""

from __future__ import annotations

from typing import Any

from governance import forksafe
from governance.integration.publisher import wrap_send_task
from governance.integration.runtime import GovernanceRuntime, attach, installed_on, on_first_bind
from governance.integration.worker import signals
from governance.policy.engine import Policy
from governance.settings import GovernanceSettings

_lock = forksafe.lock()


def celery_conf(app: Any, settings: GovernanceSettings) -> dict[str, Any]:
    """The Celery settings a governed app needs, merged into ``app``'s own.

    JSON messages (the ledger keeps every governed message to publish it again, so its
    arguments must survive a round trip through JSON); the broker's visibility timeout from the
    settings (a Redis broker redelivers an unacknowledged message after it, and the reconciler
    and the countdown limit are derived from it); a consumer that rejects a message it cannot
    read instead of stopping the worker, and that sends task events only while a monitor asks
    for them (``worker.consumer``). The other transport options of the app are kept.

    Task events are not switched on here (``worker_send_task_events``, ``task_send_sent_event``
    keep the app's own values): they cost CPU on every task, plain ones included, and Flower
    asks the workers for them while it runs. A worker started with ``-E``, or an app that sets
    ``worker_send_task_events=True`` itself, always sends them.
    """
    transport = dict(app.conf.broker_transport_options or {})
    transport["visibility_timeout"] = settings.visibility_timeout_s
    accept = list(app.conf.accept_content or [])
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": accept if "json" in accept else [*accept, "json"],
        "broker_transport_options": transport,
        "worker_consumer": "governance.integration.worker.consumer:GovernedConsumer",
    }


def install(app: Any, runtime: GovernanceRuntime) -> GovernanceRuntime:
    """Attach ``runtime`` to a Celery app: its governed tasks find it there, its publishing goes
    through the governance checks, and its workers run the maintenance thread. Installing again
    replaces the runtime (publishing is wrapped once and always uses the current one)."""
    runtime.set_raw_send(wrap_send_task(app))
    attach(app, runtime)
    signals.connect(app)
    return runtime


def govern(
    app: Any,
    settings: GovernanceSettings | None = None,
    policy: Policy | None = None,
) -> GovernanceRuntime:
    """Govern ``app``: every task based on ``GovernedTask`` is authorized, admitted, settled
    and audited, and publishing one needs a governance context.

    ``settings`` default to the ``GOVERNANCE_*`` environment variables and ``policy`` to the
    file they name; an invalid policy raises :class:`~governance.policy.loader.ConfigError`
    naming the file, the field and the reason.
    """
    settings = settings or GovernanceSettings()
    policy = policy or Policy.from_file(settings.config_path)
    app.conf.update(celery_conf(app, settings))
    return install(app, GovernanceRuntime(settings, policy))


def govern_from_environment(app: Any) -> None:
    """:func:`govern` ``app`` once, unless it already has a runtime (called when a governed
    task is bound to an app, so ``Celery(task_cls=GovernedTask)`` needs no other call)."""
    with _lock:
        if installed_on(app) is None:
            govern(app)


on_first_bind(govern_from_environment)
