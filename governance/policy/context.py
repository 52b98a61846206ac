"""Who is acting: the identity every governed action carries from publisher to worker.

The ids end up in Redis keys, audit events and message headers, so they are restricted to a small,
safe charset (no spaces, slashes or braces, which would break Redis Cluster hash tags).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_ID_LENGTH = 128
ID_CHARSET = "[A-Za-z0-9._:@-]"
_ID_CHAR = re.compile(r"[A-Za-z0-9._:@-]")
_ID_FULL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


def validate_identifier(value: str) -> str:
    """Return `value` if it is a valid id, else raise ValueError saying exactly what is wrong."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"must be at most {MAX_ID_LENGTH} characters (got {len(value)})")
    if _ID_FULL.fullmatch(value) is None:
        bad = sorted({c for c in value if _ID_CHAR.fullmatch(c) is None})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise ValueError(f"may only contain {ID_CHARSET} (found {shown} in {value!r})")
        raise ValueError(f"must start with a letter or a digit (got {value!r})")
    return value


Identifier = Annotated[str, AfterValidator(validate_identifier)]
"""A non-empty id of at most 128 chars of [A-Za-z0-9._:@-], starting with an alphanumeric."""


def new_trace_id() -> str:
    """A fresh random trace id (uuid4, hex)."""
    return uuid.uuid4().hex


class ActionContext(BaseModel):
    """The tenant, agent and run an action belongs to, plus tracing and discovery lineage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: Identifier
    agent: Identifier
    run: Identifier
    user: Identifier | None = None
    trace_id: Identifier = Field(default_factory=new_trace_id)
    discovery_depth: int = Field(default=0, ge=0)
    parent_task_id: Identifier | None = None
