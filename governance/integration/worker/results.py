"""Stored results keep no secret-named argument of a governed call.

With ``result_extended`` (the example deployment sets it), Celery's result backend writes each
task's arguments next to its state (``args``, ``kwargs`` of ``celery-task-meta-<id>``), from the
request, on every state it stores (STARTED, DEFERRED, SUCCESS, FAILURE): anyone who can read the
results would read an ``api_token`` there. The backends of a governed app store those two fields
redacted for governed tasks (:func:`governance.integration.redaction.redact`), like everything
else the layer shows; the call itself (the request, what a retry publishes) is untouched.

Celery builds a backend per thread, or one per app when it is thread-safe, lazily: the app's
backend factory is wrapped once so that every backend it builds redacts, and a backend it built
already is given the same behaviour.
"""

from __future__ import annotations

from typing import Any

from governance.integration.governed import is_governed
from governance.integration.redaction import redact

_FIELDS = ("args", "kwargs")
#: The redacting subclass of each backend class, kept importable by name (pickling a backend
#: pickles its class by reference).
_SUBCLASSES: dict[type[Any], type[Any]] = {}


class RedactedCalls:
    """Mixin of a Celery result backend: the extended fields ``args``/``kwargs`` of a governed
    task's stored result are redacted."""

    app: Any

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)  # type: ignore[misc]
        if not any(field in meta for field in _FIELDS):
            return meta
        task = self.app.tasks.get(meta.get("name")) if meta.get("name") else None
        if task is None or not is_governed(task):
            return meta
        for field in _FIELDS:
            value = meta.get(field)
            if isinstance(value, bytes | str):  # already encoded (database backends)
                decoded = self.decode(value)  # type: ignore[attr-defined]
                shown = redact(decoded)
                if shown != decoded:
                    encoded = self.encode(shown)  # type: ignore[attr-defined]
                    meta[field] = encoded.encode() if isinstance(encoded, str) else encoded
            elif isinstance(value, list | tuple | dict):
                meta[field] = redact(value)
        return meta


def redacting(backend: Any) -> Any:
    """``backend``, now storing governed calls redacted (its class swapped for a subclass)."""
    cls = type(backend)
    if isinstance(backend, RedactedCalls):
        return backend
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        name = f"Redacted{cls.__name__}"
        sub = type(name, (RedactedCalls, cls), {"__module__": __name__, "__qualname__": name})
        _SUBCLASSES[cls] = sub
        globals()[name] = sub
    backend.__class__ = sub
    return backend


def redact_stored_calls(app: Any) -> None:
    """Every result backend of ``app`` stores governed calls redacted (once per app)."""
    factory = getattr(app, "_get_backend", None)
    if factory is None or getattr(factory, "_governance_redacting", False):
        return

    def build() -> Any:
        return redacting(factory())

    build._governance_redacting = True  # type: ignore[attr-defined]
    app._get_backend = build
    built = getattr(app, "_backend", None)
    if built is not None:
        redacting(built)
