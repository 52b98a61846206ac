"""The worker wing: what happens to a governed task on the worker.

- :mod:`~governance.integration.worker.task`: ``GovernedTask`` and ``GovernedLLMTask``;
- :mod:`~governance.integration.worker.delivery`: the life of one delivery, from its headers to
  its outcome, with :mod:`~governance.integration.worker.outcome` (pure rules: retries,
  ``max_retries``, unknown outcomes, what is counted) and
  :mod:`~governance.integration.worker.settlement` (one settlement, never lost);
- :mod:`~governance.integration.worker.overlap`: the two round trips overlapping Celery's own;
- :mod:`~governance.integration.worker.request`: step timeouts and Flower's names for failures,
  in the worker's main process; :mod:`~governance.integration.worker.revoked`: tasks Celery drops;
- :mod:`~governance.integration.worker.maintenance` and
  :mod:`~governance.integration.worker.signals`: the maintenance thread and the signal handlers.

It imports the approvals wing (the gate, holding) and the floor, never the publisher.
"""
