"""When to try a failed action again: the retry policy of a tenant.

Semantics follow the seed's RetryWithBackoffPolicy: permanent errors never retry, a rate-limited
error that says when waits exactly that long, anything else backs off exponentially from a base,
up to a cap, plus random jitter so that many workers failing together do not retry together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from governance.policy.errors import ActionError, ErrorKind

MAX_DELAY_MS = 2**63 - 1
"""Delays saturate here (the seed's u64 saturating arithmetic) instead of growing without bound."""

_RNG = random.Random()


def _validate(base_ms: int, cap_ms: int | None, jitter_ratio: float) -> None:
    if base_ms < 0:
        raise ValueError(f"backoff_base_ms must be >= 0 (got {base_ms})")
    if cap_ms is not None and cap_ms < base_ms:
        raise ValueError(f"backoff_cap_ms ({cap_ms}) must be >= backoff_base_ms ({base_ms})")
    if not 0.0 <= jitter_ratio <= 1.0:
        raise ValueError(f"jitter_ratio must be within [0, 1] (got {jitter_ratio})")


def backoff_ms(
    base_ms: int,
    cap_ms: int | None,
    jitter_ratio: float,
    attempt: int,
    rng: random.Random | None = None,
) -> int:
    """`base * 2**attempt`, capped by `cap_ms`, plus uniform jitter in [0, jitter_ratio * capped].

    Never exceeds `cap_ms * (1 + jitter_ratio)`; with no jitter it never decreases with `attempt`.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    # bit_length bounds the result without building 2**attempt for huge attempts.
    if base_ms == 0:
        exp = 0
    elif attempt + base_ms.bit_length() > 63:
        exp = MAX_DELAY_MS
    else:
        exp = min(base_ms << attempt, MAX_DELAY_MS)
    capped = exp if cap_ms is None else min(exp, cap_ms)
    if jitter_ratio <= 0.0 or capped == 0:
        return capped
    jitter = int((rng or _RNG).uniform(0.0, jitter_ratio * capped))
    return min(capped + jitter, MAX_DELAY_MS)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed action is tried again."""

    max_retries: int
    backoff_base_ms: int
    backoff_cap_ms: int | None = None
    jitter_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 (got {self.max_retries})")
        _validate(self.backoff_base_ms, self.backoff_cap_ms, self.jitter_ratio)

    def delay_ms(
        self, error: ActionError, attempt: int, rng: random.Random | None = None
    ) -> int | None:
        """Milliseconds to wait before retry number `attempt` (0-based), or None to give up."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0 (got {attempt})")
        if error.kind is ErrorKind.permanent or attempt >= self.max_retries:
            return None
        if error.kind is ErrorKind.rate_limited and error.retry_after_ms is not None:
            # The callee said when; adding jitter or a cap would only come back too early or late.
            return error.retry_after_ms
        return backoff_ms(
            self.backoff_base_ms, self.backoff_cap_ms, self.jitter_ratio, attempt, rng
        )

    def budget_ms(self) -> int:
        """The longest all retries of one task may wait in total (every backoff at its cap and
        its full jitter); a provider's ``Retry-After`` is not bounded by it."""
        total = 0
        for attempt in range(self.max_retries):
            capped = backoff_ms(self.backoff_base_ms, self.backoff_cap_ms, 0.0, attempt)
            total = min(total + int(capped * (1 + self.jitter_ratio)), MAX_DELAY_MS)
        return total
