"""Resource usage of one action or a sum of them: steps, tool calls, tokens and cost.

Cost is kept in whole micro-dollars so that sums over many actions (in Python and in Redis) are
exact; `cost_usd` is only for display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

MICRO = 1_000_000

#: The fields of a Usage, in the order the store keeps them.
FIELDS = ("steps", "tool_calls", "input_tokens", "output_tokens", "cost_micro_usd")


@dataclass(frozen=True)
class Usage:
    """What an action used (or is estimated to use)."""

    steps: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0

    def __post_init__(self) -> None:
        for name in FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def cost_usd(self) -> float:
        """The cost in USD."""
        return self.cost_micro_usd / MICRO

    def at_least(self, floor: Usage) -> Usage:
        """Each field the larger of this usage's and ``floor``'s: what an attempt whose spend
        is unknown counts (``floor`` is its reservation, whatever it reported on top)."""
        return Usage(*(max(a, b) for a, b in zip(self.as_tuple(), floor.as_tuple(), strict=True)))

    def excess_over(self, reserved: Usage) -> dict[str, int]:
        """The fields where this usage is above ``reserved``, and by how much (a provider that
        reported more than the call reserved)."""
        return {
            name: mine - theirs
            for name, mine, theirs in zip(FIELDS, self.as_tuple(), reserved.as_tuple(), strict=True)
            if mine > theirs
        }

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """The fields in the order of ``FIELDS`` (and of the store's usage lists)."""
        return (
            self.steps,
            self.tool_calls,
            self.input_tokens,
            self.output_tokens,
            self.cost_micro_usd,
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.steps + other.steps,
            self.tool_calls + other.tool_calls,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_micro_usd + other.cost_micro_usd,
        )


def cost_micro_usd(
    input_tokens: int, output_tokens: int, input_usd_per_mtok: float, output_usd_per_mtok: float
) -> int:
    """Cost in micro-dollars, rounded up so that an estimate is never below the true cost.

    With prices per million tokens, micro-dollars are simply tokens x price. Decimal arithmetic on
    the prices as written (0.15, not 0.1499999...) keeps 100 x 0.15 at 15, not 16 after ceil.
    """
    exact = Decimal(input_tokens) * Decimal(repr(input_usd_per_mtok)) + Decimal(
        output_tokens
    ) * Decimal(repr(output_usd_per_mtok))
    return math.ceil(exact)
