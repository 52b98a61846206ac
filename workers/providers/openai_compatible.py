"""A provider for any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, LiteLLM, ...).

Every failure is classified for the retry policy: HTTP statuses by `classify_http_status` (429 and
Retry-After become rate-limited), timeouts, connection errors and unparseable bodies (usually a
proxy in between) are transient. And for the budget, by what the provider may have billed:

- never sent (the connection was refused or never established, or no pooled connection was
  free in time): nothing was spent;
- sent, and the outcome unknown (a read or write timeout, the connection lost after sending, a
  gateway's 502/504/524, a body that is not JSON): `outcome_unknown`, so the attempt's whole
  reservation is counted as spent;
- answered: the answer's `usage`; an answer without it (or with something else than token
  counts) is returned with its counts None, and the task counts the whole reservation.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import httpx

from governance.policy.actions import LLMCall
from governance.policy.errors import ActionError, classify_http_status
from workers.providers.base import Completion

ERROR_BODY_CHARS = 500
"""How much of an error response's body goes into the error message."""

DEFAULT_TIMEOUT_S = 30.0
"""The deadline of one request (each of connect, write, read and pool), unless told otherwise."""

NOT_SENT: tuple[type[httpx.RequestError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)
"""Failures before any of the request left: no connection, or a request httpx refused to send.
Every other failure of a request happened after it was sent, at least in part."""


class OpenAICompatibleProvider:
    """Chat completions over HTTP against `{base_url}/chat/completions`.

    A client passed in is used but not closed (its owner closes it); a client this provider
    creates is closed by `close()` or by leaving the `with` block.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        client: httpx.Client | None = None,
    ) -> None:
        try:
            parsed = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"provider {name!r}: invalid base_url {base_url!r}: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"provider {name!r}: base_url must be an http(s) URL: {base_url!r}")
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=self._timeout)

    def __repr__(self) -> str:
        # The API key stays out of logs and tracebacks.
        return f"OpenAICompatibleProvider(name={self.name!r}, url={self.url!r})"

    def complete(self, call: LLMCall, *, attempt: int) -> Completion:
        """POST the call and parse the answer; `attempt` is unused (the server keeps no script)."""
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = {
            "model": call.model,
            "messages": [{"role": m.role, "content": m.content} for m in call.messages],
            "max_tokens": call.max_tokens,
        }
        try:
            response = self._client.post(
                self.url, json=payload, headers=headers, timeout=self._timeout
            )
        except NOT_SENT as exc:
            raise ActionError.transient(
                f"{self.name}: {type(exc).__name__}: {exc} (the request was not sent)"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ActionError.transient(
                f"{self.name}: timed out after the request was sent: {type(exc).__name__}",
                outcome_unknown=True,
            ) from exc
        except httpx.RequestError as exc:
            raise ActionError.transient(
                f"{self.name}: {type(exc).__name__} after the request was sent: {exc}",
                outcome_unknown=True,
            ) from exc
        status = response.status_code
        if not 200 <= status < 300:
            error = classify_http_status(status, response.headers.get("retry-after"))
            if error is None:  # 1xx/3xx: redirects are not followed, nothing else is expected
                error = ActionError.permanent(f"HTTP {status}", status=status)
            snippet = response.text[:ERROR_BODY_CHARS]
            raise ActionError(
                f"{self.name}: {error.message}: {snippet}",
                error.kind,
                error.retry_after_ms,
                status,
                error.outcome_unknown,
            )
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ActionError.transient(
                f"{self.name}: response is not JSON ({exc}): {response.text[:ERROR_BODY_CHARS]}",
                status=status,
                outcome_unknown=True,
            ) from exc
        return _parse_completion(self.name, call, body)

    def close(self) -> None:
        """Close the HTTP client if this provider created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> OpenAICompatibleProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _field(value: Any, path: str) -> Any:
    """`value` at the dotted `path` (integers index lists), or a permanent error naming it."""
    current = value
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise _malformed(f"missing {'.'.join(walked)}")
    return current


def _malformed(what: str) -> ActionError:
    return ActionError.permanent(f"malformed chat completion: {what}")


def _tokens(body: Any, path: str) -> int | None:
    """The token count at `path`, or None when the answer has none (or not a count)."""
    try:
        value = _field(body, path)
    except ActionError:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _parse_completion(provider: str, call: LLMCall, body: Any) -> Completion:
    try:
        content = _field(body, "choices.0.message.content")
        finish_reason = _field(body, "choices.0.finish_reason")
    except ActionError as exc:
        raise ActionError.permanent(f"{provider}: {exc.message}") from None
    input_tokens = _tokens(body, "usage.prompt_tokens")
    output_tokens = _tokens(body, "usage.completion_tokens")
    model = body.get("model") if isinstance(body, dict) else None
    return Completion(
        text=content if isinstance(content, str) else "",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        model=model if isinstance(model, str) and model else call.model,
        finish_reason=finish_reason if isinstance(finish_reason, str) else "unknown",
    )
