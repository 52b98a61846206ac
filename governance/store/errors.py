"""The one error the store raises when Redis cannot answer: callers fail closed on it."""

from __future__ import annotations


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or did not answer, so no decision was made.

    Admission never reports "admitted" when Redis could not say so: this error is raised instead,
    and the integration turns it into a deferral (the task is retried later, never run ungoverned).
    """

    def __init__(self, operation: str, cause: BaseException) -> None:
        super().__init__(f"governance state store unavailable during {operation}: {cause}")
        self.operation = operation
        self.cause = cause

    def __reduce__(self) -> tuple[type[StoreUnavailable], tuple[str, BaseException]]:
        return (type(self), (self.operation, self.cause))
