"""The integration layer: thin glue that governs Celery tasks with the policy and the store.

``GovernedTask`` (and ``GovernedLLMTask``) is the task base class; ``governance_context`` gives
publishing a context (``task.delay(...)`` inside it is authorized, recorded and published);
``govern(app)`` sets an app up from the ``GOVERNANCE_*`` settings (``Celery(task_cls=GovernedTask)``
does it by itself); ``install`` attaches a ready ``GovernanceRuntime`` (settings, policy, state).

The layer has three wings over one floor, each naming its callers (``make lint`` checks that no
import runs up or across; see docs/design.md):

- the floor: :mod:`~governance.integration.runtime` (settings, policy, state of an app in one
  process) and its helpers (headers, messages, events, redaction, errors, executions, leases,
  store health, owed settlements, policy reloads);
- :mod:`~governance.integration.approvals`: the gate ("is this call released?"), holding, the
  reviewers' workflow, notifications;
- :mod:`~governance.integration.publisher`: every governed task leaves with its context,
  authorized and recorded;
- :mod:`~governance.integration.worker`: the task class, the life of a delivery, the outcome
  rules, settlement, maintenance;
- :mod:`~governance.integration.setup`: the roof that wires an app.
"""

from governance.integration.errors import (
    ActionDenied,
    ActionFailed,
    ApprovalRejected,
    GovernanceError,
    LimitExceeded,
    MessageRefused,
    ResultLost,
)
from governance.integration.execution import (
    current_execution,
    report_usage,
    report_usage_unknown,
)
from governance.integration.headers import GovernanceHeaders, HeaderError, read_headers
from governance.integration.publisher import MissingContext, governance_context, submit
from governance.integration.runtime import GovernanceRuntime, runtime_for
from governance.integration.setup import celery_conf, govern, install
from governance.integration.worker.task import GovernedLLMTask, GovernedTask

__all__ = [
    "ActionDenied",
    "ActionFailed",
    "ApprovalRejected",
    "GovernanceError",
    "GovernanceHeaders",
    "GovernanceRuntime",
    "GovernedLLMTask",
    "GovernedTask",
    "HeaderError",
    "LimitExceeded",
    "MessageRefused",
    "MissingContext",
    "ResultLost",
    "celery_conf",
    "current_execution",
    "govern",
    "governance_context",
    "install",
    "read_headers",
    "report_usage",
    "report_usage_unknown",
    "runtime_for",
    "submit",
]
