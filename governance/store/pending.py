"""A call written now whose answer is read later: the store's "write now, read later" round trips.

The hot path writes a script call and reads its reply after other work (Celery's own writes,
see ``direct.py``): :meth:`Admitter.begin_admit` and :meth:`Admitter.begin_settle` return a
:class:`Pending` of their outcome, :meth:`StateStore.begin` one of the raw reply. Its
:meth:`Pending.result` reads the answer, once, on the thread that wrote the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Pending(Generic[T]):
    """The answer of a call already written: :meth:`result` reads it (at most once; later calls
    give the same value, or raise the same error)."""

    __slots__ = ("_error", "_read", "_value")

    def __init__(self, read: Callable[[], T]) -> None:
        self._read: Callable[[], T] | None = read
        self._value: T | None = None
        self._error: BaseException | None = None

    @classmethod
    def ready(cls, value: T) -> Pending[T]:
        """An answer known already (a call made at once)."""
        pending = cls(lambda: value)
        pending.result()
        return pending

    def result(self) -> T:
        """The answer (read now if it was not yet); raises what reading it raised."""
        read = self._read
        if read is not None:
            try:
                self._value = read()
            except Exception as exc:
                self._error = exc
            self._read = None
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def then(self, parse: Callable[[T], U]) -> Pending[U]:
        """The answer of this call, turned into something else when it is read."""
        return Pending(lambda: parse(self.result()))
