"""A deterministic, offline provider for demos and tests, scripted by directives in the prompt.

The reply is "echo: " followed by the last user message (directives removed, whitespace collapsed),
cut to `max_tokens` words. Usage is exact and predictable: `input_tokens` is the library's own
`estimate_input_tokens(call.messages)`, so a budget reservation for the fake is exact;
`output_tokens` is the reply's word count, at most `max_tokens`.

Directives, written anywhere in the last user message (`attempt` is 0 on the first try):

- `[[fill]]`: report exactly `max_tokens` output tokens (to use up a budget quickly).
- `[[fail transient N]]`: raise a transient `ActionError` while `attempt < N`, then succeed.
- `[[fail 429 MS]]`, `[[fail 429 MS N]]`: raise a rate-limited `ActionError` with
  `retry_after_ms=MS` while `attempt < N` (N defaults to 1), then succeed.
- `[[fail permanent]]`: raise a permanent `ActionError` on every attempt.
- `[[fail timeout N]]`: raise a transient `ActionError` with `outcome_unknown` (what a read
  timeout after the request was sent raises) while `attempt < N`, then succeed.
- `[[sleep MS]]`: sleep MS milliseconds (at most 60 000) before answering or failing.
- `[[input N]]`: report N input tokens instead of the estimate (a provider that counts more
  than was reserved, or less).
- `[[no usage]]`: answer without token counts (what was used is then unknown).

Directives combine, e.g. `[[sleep 200]] [[fail transient 2]] [[fill]] hello`; failures are checked
in the order permanent, transient, timeout, 429, each against the absolute attempt number.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from governance.policy.actions import LLMCall, estimate_input_tokens
from governance.policy.errors import ActionError
from workers.providers.base import Completion

MAX_SLEEP_MS = 60_000
"""Longer sleeps are cut to this, so a typo cannot pin a worker for hours."""

_DIRECTIVE = re.compile(
    r"\[\[\s*(?:"
    r"(?P<fill>fill)"
    r"|fail\s+transient\s+(?P<transient>\d+)"
    r"|fail\s+429\s+(?P<retry_ms>\d+)(?:\s+(?P<times_429>\d+))?"
    r"|(?P<permanent>fail\s+permanent)"
    r"|fail\s+timeout\s+(?P<timeouts>\d+)"
    r"|sleep\s+(?P<sleep_ms>\d+)"
    r"|input\s+(?P<input_tokens>\d+)"
    r"|(?P<no_usage>no\s+usage)"
    r")\s*\]\]",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Script:
    """The directives found in a message, and the message without them."""

    text: str
    fill: bool = False
    transient_failures: int = 0
    rate_limit_failures: int = 0
    retry_after_ms: int = 0
    permanent: bool = False
    timeouts: int = 0
    sleep_ms: int = 0
    input_tokens: int | None = None
    no_usage: bool = False


def parse_script(content: str) -> Script:
    """Read the directives of `content`; when one is given twice, the last one wins."""
    fill = permanent = no_usage = False
    transient = rate_limited = retry_after_ms = sleep_ms = timeouts = 0
    input_tokens: int | None = None
    for match in _DIRECTIVE.finditer(content):
        if match["fill"]:
            fill = True
        elif match["transient"] is not None:
            transient = int(match["transient"])
        elif match["timeouts"] is not None:
            timeouts = int(match["timeouts"])
        elif match["input_tokens"] is not None:
            input_tokens = int(match["input_tokens"])
        elif match["no_usage"]:
            no_usage = True
        elif match["retry_ms"] is not None:
            retry_after_ms = int(match["retry_ms"])
            rate_limited = int(match["times_429"]) if match["times_429"] is not None else 1
        elif match["permanent"]:
            permanent = True
        elif match["sleep_ms"] is not None:
            sleep_ms = min(int(match["sleep_ms"]), MAX_SLEEP_MS)
    return Script(
        text=" ".join(_DIRECTIVE.sub(" ", content).split()),
        fill=fill,
        transient_failures=transient,
        rate_limit_failures=rate_limited,
        retry_after_ms=retry_after_ms,
        permanent=permanent,
        timeouts=timeouts,
        sleep_ms=sleep_ms,
        input_tokens=input_tokens,
        no_usage=no_usage,
    )


class FakeProvider:
    """Echoes the last user message; fails, sleeps or fills its budget when the message says so."""

    def __init__(self, name: str = "fake", *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.name = name
        self._sleep = sleep

    def complete(self, call: LLMCall, *, attempt: int) -> Completion:
        """Answer `call` as the module docstring describes; `attempt` is 0 on the first try."""
        last_user = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
        script = parse_script(last_user)
        if script.sleep_ms:
            self._sleep(script.sleep_ms / 1000)
        if script.permanent:
            raise ActionError.permanent("fake provider: permanent failure (scripted)", status=400)
        if attempt < script.transient_failures:
            raise ActionError.transient(
                f"fake provider: transient failure (attempt {attempt + 1} of "
                f"{script.transient_failures})"
            )
        if attempt < script.timeouts:
            raise ActionError.transient(
                f"fake provider: timed out after the request was sent (attempt {attempt + 1} "
                f"of {script.timeouts})",
                outcome_unknown=True,
            )
        if attempt < script.rate_limit_failures:
            raise ActionError.rate_limited(
                "fake provider: 429 Too Many Requests",
                retry_after_ms=script.retry_after_ms,
                status=429,
            )
        words = script.text.split()
        reply = " ".join(["echo:", *words[: call.max_tokens]])
        cut = len(words) > call.max_tokens
        output_tokens = call.max_tokens if script.fill else min(call.max_tokens, len(reply.split()))
        input_tokens = (
            estimate_input_tokens(call.messages)
            if script.input_tokens is None
            else script.input_tokens
        )
        return Completion(
            text=reply,
            input_tokens=None if script.no_usage else input_tokens,
            output_tokens=None if script.no_usage else output_tokens,
            model=call.model,
            finish_reason="length" if cut or script.fill else "stop",
        )

    def close(self) -> None:
        """Nothing to release."""
