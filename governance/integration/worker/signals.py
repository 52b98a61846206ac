"""Celery signal handlers of the worker: the maintenance thread of every worker, and the
deployment marker it keeps in the state Redis (:mod:`governance.integration.worker.marker`),
started and stopped with it; the outage filter of its log handlers
(:mod:`governance.integration.store_health`); the app's result backends, which store governed
calls redacted (:mod:`governance.integration.worker.results`); the ``task_prerun``/
``task_postrun`` hooks of :mod:`governance.integration.worker.overlap`, ``task_revoked``
(:mod:`governance.integration.worker.revoked`), and the owed audit seals of an exiting process.

Publishing needs no signal: the app's ``send_task`` is wrapped by ``setup.install`` (see
:mod:`governance.integration.publisher`), because a signal cannot refuse a message.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from governance.integration.runtime import installed_on, runtime_for
from governance.integration.store_health import install_outage_log
from governance.integration.worker import overlap, revoked
from governance.integration.worker.maintenance import MaintenanceThread
from governance.integration.worker.marker import MarkerKeeper
from governance.integration.worker.pool_keeper import served_pools
from governance.integration.worker.results import redact_stored_calls

_connected: set[int] = set()
_pumps: dict[int, Any] = {}
_markers: dict[int, MarkerKeeper] = {}


def connect(app: Any) -> None:
    """Connect the handlers once per app."""
    if id(app) in _connected:
        return
    _connected.add(id(app))
    overlap.connect()
    revoked.connect()
    # Stored results (result_extended) keep no secret-named argument of a governed call.
    redact_stored_calls(app)

    def start_pump(sender: Any = None, **_: Any) -> None:
        node = getattr(sender, "hostname", None)
        runtime = runtime_for(app)
        # This Redis holds the deployment's state: govctl checks for the mark.
        marker = MarkerKeeper(runtime, node or "worker")
        marker.start()
        _markers[id(app)] = marker
        pump = MaintenanceThread(app, runtime, node=node, serves=served_pools(sender))
        pump.start()
        _pumps[id(app)] = pump

    def stop_pump(sender: Any = None, **_: Any) -> None:
        pump = _pumps.pop(id(app), None)
        if pump is not None:
            pump.stop()
        marker = _markers.pop(id(app), None)
        if marker is not None:
            marker.stop()

    def flush_owed_seals(**_: Any) -> None:
        runtime = installed_on(app)
        if runtime is not None:
            runtime.flush_owed_seals()

    def quiet_outages(logger: Any = None, **_: Any) -> None:
        # An outage of the state store is logged once when it starts, then at most every 30 s
        # (see store_health), not by every thread at each of its rounds.
        install_outage_log(logger)

    signals.after_setup_logger.connect(quiet_outages, weak=False)
    signals.worker_ready.connect(start_pump, weak=False)
    signals.worker_shutdown.connect(stop_pump, weak=False)
    # A pool process that exits (recycled, or the worker's warm shutdown) seals its last entries.
    signals.worker_process_shutdown.connect(flush_owed_seals, weak=False)
    signals.worker_shutdown.connect(flush_owed_seals, weak=False)
