"""The integration layer: thin glue that governs Celery tasks with the policy and the store.

``GovernedTask`` (and ``GovernedLLMTask``) is the task base class; ``governance_context`` gives
publishing a context (``task.delay(...)`` inside it is authorized, recorded and published);
``install`` attaches a ``GovernanceRuntime`` (settings, policy, state) to a Celery app.
"""

from governance.integration.errors import (
    ActionDenied,
    ActionFailed,
    ApprovalRejected,
    GovernanceError,
    LimitExceeded,
)
from governance.integration.execution import current_execution, report_usage
from governance.integration.headers import GovernanceHeaders, HeaderError, read_headers
from governance.integration.publish import MissingContext, governance_context, submit
from governance.integration.runtime import GovernanceRuntime, install, runtime_for
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
    "current_execution",
    "governance_context",
    "install",
    "read_headers",
    "report_usage",
    "runtime_for",
    "submit",
]
