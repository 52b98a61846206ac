"""The integration layer: thin glue that governs Celery tasks with the policy and the store.

``GovernedTask`` is the task base class, ``submit`` the publisher API, ``install`` attaches a
``GovernanceRuntime`` (settings, policy, state) to a Celery app.
"""

from governance.integration.errors import (
    ActionDenied,
    ActionFailed,
    GovernanceError,
    LimitExceeded,
)
from governance.integration.execution import current_execution, report_usage
from governance.integration.headers import GovernanceHeaders, HeaderError, read_headers
from governance.integration.publish import submit
from governance.integration.runtime import GovernanceRuntime, install, runtime_for
from governance.integration.task import GovernedTask

__all__ = [
    "ActionDenied",
    "ActionFailed",
    "GovernanceError",
    "GovernanceHeaders",
    "GovernanceRuntime",
    "GovernedTask",
    "HeaderError",
    "LimitExceeded",
    "current_execution",
    "install",
    "read_headers",
    "report_usage",
    "runtime_for",
    "submit",
]
