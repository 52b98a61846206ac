"""`http_get`: a real HTTP GET to a host on the tenant's domain allow-list.

The URL is parsed once with httpx, the same parser that sends the request, so the host that was
checked is the host that is contacted. Redirects are not followed (a redirect could leave the
allow-list); a 3xx comes back as a result with its `location` header.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from pydantic import Field

from governance.policy.errors import ActionError, classify_http_status
from workers.tools.base import InputRejected, ToolEnv, ToolInput, ToolSpec

MAX_BODY_BYTES = 64 * 1024
"""The body is cut here (`truncated` says so); the rest is never downloaded."""

RETURNED_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "location",
    "retry-after",
    "etag",
    "last-modified",
)
"""The response headers passed back to the agent; the others are dropped to keep results small."""


class HttpGetInput(ToolInput):
    """The absolute http(s) URL to fetch."""

    url: Annotated[str, Field(min_length=1, max_length=4096)]


def host_allowed(host: str, allowed_domains: tuple[str, ...]) -> bool:
    """Whether `host` equals an allowed domain or is a subdomain of one (case-insensitive).

    `api.example.com` is allowed by `example.com`; `evilexample.com` is not.
    """
    host = host.lower().rstrip(".")
    for domain in allowed_domains:
        domain = domain.lower().strip().strip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def allowed_url(url: str, env: ToolEnv) -> httpx.URL:
    """Parse `url` and return it if its scheme is http(s) and its host is allowed."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InputRejected(f"invalid url {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise InputRejected(f"url {url!r}: only http and https are allowed")
    if not parsed.host:
        raise InputRejected(f"url {url!r} has no host")
    if not host_allowed(parsed.host, env.allowed_domains):
        raise InputRejected(f"url {url!r}: domain {parsed.host!r} is not in the allowed domains")
    return parsed


def check(inp: HttpGetInput, env: ToolEnv) -> None:
    """The URL must be http(s) and its host on the allow-list; nothing is sent."""
    allowed_url(inp.url, env)


def _decode(body: bytes, encoding: str | None) -> str:
    try:
        return body.decode(encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def run(inp: HttpGetInput, env: ToolEnv) -> dict[str, Any]:
    """GET the URL and return status, a few headers and the start of the body.

    4xx/5xx raise the `ActionError` that `classify_http_status` gives (429 rate-limited with the
    Retry-After, 5xx transient, other 4xx permanent); network errors are transient.
    """
    url = allowed_url(inp.url, env)
    try:
        with (
            httpx.Client(timeout=env.http_timeout_s, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            error = classify_http_status(response.status_code, response.headers.get("retry-after"))
            if error is not None:
                raise ActionError(
                    f"GET {url}: {error.message}", error.kind, error.retry_after_ms, error.status
                )
            body = bytearray()
            truncated = False
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    truncated = True
                    del body[MAX_BODY_BYTES:]
                    break
            headers = {
                name: response.headers[name]
                for name in RETURNED_HEADERS
                if name in response.headers
            }
            status = response.status_code
            encoding = response.charset_encoding
    except httpx.TransportError as exc:
        raise ActionError.transient(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    except httpx.RequestError as exc:  # e.g. a body that fails to decompress
        raise ActionError.permanent(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    return {
        "status": status,
        "headers": headers,
        "body": _decode(bytes(body), encoding),
        "truncated": truncated,
    }


SPEC = ToolSpec(
    name="http_get",
    side_effect_class="network.read",
    input_model=HttpGetInput,
    run=run,
    check=check,
    description="HTTP GET a URL on an allowed domain; returns status, headers and up to 64 KiB.",
)
