"""The errors a governed task ends with. Each carries one readable reason, and pickles/serializes
as a single string argument so Celery's result backend can rebuild it on the caller's side.
"""

from __future__ import annotations


class GovernanceError(Exception):
    """Base of every error the governance layer ends a task with."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ActionDenied(GovernanceError):
    """Authorization said no (or the message had no valid context, or the input was invalid).

    The body never ran. Raised at publish time too, so a caller learns at once.
    """


class LimitExceeded(GovernanceError):
    """A limit that waiting does not fix: a budget exhausted for its period, a discovery limit,
    a loop, an idle run, or a wait longer than the tenant's wait limit."""


class ActionFailed(GovernanceError):
    """The body failed with a permanent error, or with a retryable one after its last retry."""


class ResultLost(GovernanceError):
    """The task ran and settled (its usage is counted), but its result was never stored: its
    worker died in between. It is not run again (that would run the action twice)."""


class ApprovalRejected(GovernanceError):
    """A reviewer rejected the held action, or its hold expired without a decision."""


class MessageRefused(GovernanceError):
    """The worker could not read the task's message (its body or headers are malformed): it was
    rejected without running, and the worker went on."""


class ApprovalRefused(GovernanceError):
    """A reviewer's decision was refused: unknown task, not held, not a reviewer, self-approval,
    or the same reviewer twice. Raised to the reviewer (``govctl``), never ends a task."""


#: Set on the exception a task raises when its own ``max_retries`` is reached
#: (``GovernedTask.retry``): it fails the task, whatever the tenant's retry policy allows.
RETRIES_EXHAUSTED = "governance_retries_exhausted"


class GovernedRetry(Exception):
    """Raised by ``GovernedTask.retry()`` inside a body: the attempt settles, then the worker
    publishes the next one after ``delay_s``. Not an outcome: Celery shows the task as RETRY."""

    def __init__(self, exc: BaseException | None, delay_s: float) -> None:
        super().__init__(f"retry in {delay_s:g} s")
        self.exc = exc
        self.delay_s = delay_s


#: Errors that end a governed task as expected outcomes: logged without a traceback.
GOVERNANCE_ERRORS: tuple[type[GovernanceError], ...] = (
    ActionDenied,
    LimitExceeded,
    ActionFailed,
    ApprovalRejected,
    MessageRefused,
)
