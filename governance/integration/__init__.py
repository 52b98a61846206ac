"""The integration layer: thin glue that governs Celery tasks with the policy and the store.

``GovernedTask`` (and ``GovernedLLMTask``) is the task base class; ``governance_context`` gives
publishing a context (``task.delay(...)`` inside it is authorized, recorded and published);
``govern(app)`` sets an app up from the ``GOVERNANCE_*`` settings (``Celery(task_cls=GovernedTask)``
does it by itself); ``install`` attaches a ready ``GovernanceRuntime`` (settings, policy, state).
"""

from governance.integration.errors import (
    ActionDenied,
    ActionFailed,
    ApprovalRejected,
    GovernanceError,
    LimitExceeded,
    ResultLost,
)
from governance.integration.execution import (
    current_execution,
    report_usage,
    report_usage_unknown,
)
from governance.integration.headers import GovernanceHeaders, HeaderError, read_headers
from governance.integration.publish import MissingContext, governance_context, submit
from governance.integration.runtime import GovernanceRuntime, install, runtime_for
from governance.integration.setup import celery_conf, govern
from governance.integration.task import GovernedLLMTask, GovernedTask

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
