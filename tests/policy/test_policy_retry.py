"""RetryPolicy: the seed's backoff examples, validation, and properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from governance.policy import ActionError, RetryPolicy

TRANSIENT = ActionError.transient("timeout")


def test_exponential_backoff_examples_from_the_seed() -> None:
    policy = RetryPolicy(5, 50, 500, 0.0)
    assert [policy.delay_ms(TRANSIENT, n) for n in range(3)] == [50, 100, 200]


def test_backoff_stops_growing_at_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, backoff_base_ms=50, backoff_cap_ms=500)
    assert [policy.delay_ms(TRANSIENT, n) for n in range(3, 7)] == [400, 500, 500, 500]


def test_without_cap_backoff_keeps_doubling() -> None:
    policy = RetryPolicy(10, 10)
    assert policy.delay_ms(TRANSIENT, 9) == 10 * 2**9


def test_positional_and_keyword_construction_are_the_same() -> None:
    assert RetryPolicy(3, 50, 500, 0.1) == RetryPolicy(
        max_retries=3, backoff_base_ms=50, backoff_cap_ms=500, jitter_ratio=0.1
    )


def test_permanent_error_never_retries() -> None:
    policy = RetryPolicy(5, 50)
    assert policy.delay_ms(ActionError.permanent("bad request"), 0) is None


def test_gives_up_once_attempt_reaches_max_retries() -> None:
    policy = RetryPolicy(2, 10)
    assert policy.delay_ms(TRANSIENT, 0) == 10
    assert policy.delay_ms(TRANSIENT, 1) == 20
    assert policy.delay_ms(TRANSIENT, 2) is None
    assert policy.delay_ms(TRANSIENT, 7) is None


def test_zero_max_retries_never_retries() -> None:
    assert RetryPolicy(0, 10).delay_ms(TRANSIENT, 0) is None


def test_rate_limited_waits_exactly_retry_after() -> None:
    policy = RetryPolicy(3, 100)
    assert policy.delay_ms(ActionError.rate_limited("429", 2500), 0) == 2500


def test_retry_after_is_neither_capped_nor_jittered() -> None:
    policy = RetryPolicy(3, 100, 500, 1.0)
    error = ActionError.rate_limited("429", 60_000)
    assert {policy.delay_ms(error, 1, random.Random(seed)) for seed in range(20)} == {60_000}


def test_rate_limited_without_retry_after_backs_off() -> None:
    policy = RetryPolicy(3, 100)
    assert policy.delay_ms(ActionError.rate_limited("429"), 1) == 200


def test_rate_limited_still_gives_up_after_max_retries() -> None:
    assert RetryPolicy(1, 100).delay_ms(ActionError.rate_limited("429", 5), 1) is None


def test_huge_attempt_does_not_overflow() -> None:
    policy = RetryPolicy(10**9, 1, 30_000)
    assert policy.delay_ms(TRANSIENT, 10**8) == 30_000
    uncapped = RetryPolicy(10**9, 1).delay_ms(TRANSIENT, 10**8)
    assert uncapped == 2**63 - 1


def test_jitter_stays_within_ratio_and_varies() -> None:
    policy = RetryPolicy(5, 1000, None, 0.5)
    rng = random.Random(7)
    delays = [policy.delay_ms(TRANSIENT, 0, rng) for _ in range(200)]
    assert all(d is not None and 1000 <= d <= 1500 for d in delays)
    assert len(set(delays)) > 10


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(5, 1000, None, 0.5)
    assert policy.delay_ms(TRANSIENT, 2, random.Random(1)) == policy.delay_ms(
        TRANSIENT, 2, random.Random(1)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 10), "max_retries"),
        ((1, -10), "backoff_base_ms"),
        ((1, 100, 50), "backoff_cap_ms"),
        ((1, 100, 200, 1.5), "jitter_ratio"),
        ((1, 100, 200, -0.1), "jitter_ratio"),
    ],
)
def test_invalid_retry_policies_are_rejected(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(*args)


def test_negative_attempt_is_rejected() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy(3, 10).delay_ms(TRANSIENT, -1)


@given(
    base=st.integers(0, 10_000),
    extra=st.integers(0, 100_000),
    jitter=st.floats(0.0, 1.0),
    attempt=st.integers(0, 200),
    seed=st.integers(0, 2**32),
)
def test_backoff_never_exceeds_cap_plus_jitter(
    base: int, extra: int, jitter: float, attempt: int, seed: int
) -> None:
    cap = base + extra
    policy = RetryPolicy(attempt + 1, base, cap, jitter)
    delay = policy.delay_ms(TRANSIENT, attempt, random.Random(seed))
    assert delay is not None
    assert 0 <= delay <= cap * (1 + jitter)


@given(
    base=st.integers(0, 10_000),
    cap=st.one_of(st.none(), st.integers(10_000, 10**7)),
    attempts=st.lists(st.integers(0, 100), min_size=2, max_size=10),
)
def test_backoff_without_jitter_never_decreases(
    base: int, cap: int | None, attempts: list[int]
) -> None:
    policy = RetryPolicy(101, base, cap, 0.0)
    delays = [policy.delay_ms(TRANSIENT, n) for n in sorted(attempts)]
    assert all(d is not None for d in delays)
    assert delays == sorted(delays)  # type: ignore[type-var]
