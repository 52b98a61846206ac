"""check_limit, violation and warning messages, and the long-running presets."""

from __future__ import annotations

import pytest

from governance.policy import (
    PRESETS,
    Allowed,
    Blocked,
    LimitWarning,
    LongRunningLimits,
    NearLimit,
    Violation,
    ViolationType,
    check_limit,
)

TOKENS = ViolationType.token_limit


def test_over_the_limit_is_blocked_with_the_seed_message() -> None:
    result = check_limit(TOKENS, 105, 100)
    assert isinstance(result, Blocked)
    assert result.is_blocked
    assert not result.is_allowed
    assert result.message == "token_limit exceeded: 105 / 100 (105%)"
    assert (result.violation.current, result.violation.limit) == (105, 100)


def test_exactly_at_the_threshold_warns() -> None:
    result = check_limit(TOKENS, 80, 100)
    assert isinstance(result, NearLimit)
    assert result.is_allowed
    assert not result.is_blocked
    assert result.percent == 80
    assert result.message == "token_limit at 80%: 80 / 100"


def test_just_below_the_threshold_is_allowed() -> None:
    result = check_limit(TOKENS, 79, 100)
    assert isinstance(result, Allowed)
    assert result.is_allowed
    assert not result.is_blocked


def test_exactly_at_the_limit_warns_but_is_not_blocked() -> None:
    result = check_limit(TOKENS, 100, 100)
    assert isinstance(result, NearLimit)
    assert result.percent == 100


def test_custom_threshold() -> None:
    assert isinstance(check_limit(TOKENS, 50, 100, warning_threshold_pct=50), NearLimit)
    assert isinstance(check_limit(TOKENS, 49, 100, warning_threshold_pct=50), Allowed)


def test_percent_is_exact_for_integers() -> None:
    # 29/100*100 is 28.999... in floating point; the threshold must still see 29.
    assert isinstance(check_limit(TOKENS, 29, 100, warning_threshold_pct=29), NearLimit)


def test_limit_zero_allows_nothing() -> None:
    assert isinstance(check_limit(ViolationType.step_limit, 0, 0), Allowed)
    blocked = check_limit(ViolationType.step_limit, 1, 0)
    assert isinstance(blocked, Blocked)
    assert blocked.message == "step_limit exceeded: 1 / 0 (limit is 0)"


def test_no_limit_is_allowed() -> None:
    assert isinstance(check_limit(TOKENS, 10**12, None), Allowed)


def test_cost_messages_print_dollars() -> None:
    blocked = check_limit(ViolationType.cost_limit, 5.02, 5.0)
    assert isinstance(blocked, Blocked)
    assert blocked.message == "cost_limit exceeded: $5.02 / $5.00 (100%)"
    warned = check_limit(ViolationType.cost_limit, 4.0, 5.0)
    assert isinstance(warned, NearLimit)
    assert warned.message == "cost_limit at 80%: $4.00 / $5.00"


def test_negative_current_is_rejected() -> None:
    with pytest.raises(ValueError, match="current"):
        check_limit(TOKENS, -1, 10)


def test_violation_and_warning_can_be_built_directly() -> None:
    assert Violation(TOKENS, 150, 100).message == "token_limit exceeded: 150 / 100 (150%)"
    assert LimitWarning(TOKENS, 90, 100).percent == 90
    custom = Violation(ViolationType.cooldown, 1, 0, "provider 'fake' cooling down for 2s")
    assert custom.message == "provider 'fake' cooling down for 2s"


def test_the_seeds_name_of_near_limit_is_deprecated_and_not_exported() -> None:
    import governance
    import governance.policy
    from governance.policy import limits

    with pytest.warns(DeprecationWarning, match="NearLimit"):
        assert limits.Warning is NearLimit
    assert "Warning" not in governance.policy.__all__
    assert "Warning" not in governance.__all__
    assert not hasattr(governance.policy, "Warning")


def test_violation_type_values_are_their_names() -> None:
    assert {v.value for v in ViolationType} == {v.name for v in ViolationType}
    assert str(ViolationType.same_step_loop) == "same_step_loop"
    assert len(ViolationType) == 19


def test_presets_match_the_seed() -> None:
    """The seed's values; the wall-time limits are this project's (the seed keeps them in
    its per-run ResourceLimits, with the same 1 s grace)."""
    assert PRESETS["standard"] == LongRunningLimits(50, 5, 5.0, 1800, 3, max_wall_time_s=7200)
    assert PRESETS["extended"] == LongRunningLimits(300, 10, 50.0, 14400, 5, max_wall_time_s=86400)
    assert PRESETS["unlimited"] == LongRunningLimits(None, None, 100.0, 86400, None)
    assert PRESETS["disabled"] == LongRunningLimits(None, None, None, None, None)
    assert set(PRESETS) == {"standard", "extended", "unlimited", "disabled"}
    assert {p.wall_time_grace_s for p in PRESETS.values()} == {1.0}


def test_preset_fields_by_name() -> None:
    standard = PRESETS["standard"]
    assert standard.max_discovered_steps == 50
    assert standard.max_discovery_depth == 5
    assert standard.cost_alert_usd == 5.0
    assert standard.idle_timeout_s == 1800
    assert standard.max_same_step_repetitions == 3
