"""The answer of authorization: what happens to an action, why, and which config rule said so."""

from __future__ import annotations

from dataclasses import dataclass

from governance.policy.tiers import Outcome, Tier, TierLevel


@dataclass(frozen=True)
class Decision:
    """An authorization decision.

    `rule` is the config path that decided (e.g. `tenants.acme.allowed_tools`, `defaults.deny[0]`,
    `tenants.acme.tiers.agents.researcher`, or "grant"); `tier` is None when the action was
    denied before a tier was resolved; `granted` says an unexpired grant covered the action.
    """

    outcome: Outcome
    reason: str
    tier: Tier | None
    rule: str
    action_class: str | None
    granted: bool = False
    tier_level: TierLevel | None = None
    #: The version of the policy that decided (its content hash).
    policy_version: str = ""

    @property
    def allowed(self) -> bool:
        """True only when the action may run now (outcome allow)."""
        return self.outcome is Outcome.allow

    @property
    def denied(self) -> bool:
        """True when the action must not run at all."""
        return self.outcome is Outcome.deny

    def to_dict(self) -> dict[str, str | bool | None]:
        """Plain values for audit events and message headers."""
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "tier": None if self.tier is None else self.tier.value,
            "rule": self.rule,
            "action_class": self.action_class,
            "granted": self.granted,
            "tier_level": None if self.tier_level is None else self.tier_level.value,
        }
