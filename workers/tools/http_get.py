"""`http_get`: a real HTTP GET to a host on the tenant's domain allow-list, at a public address.

What it guarantees (each refusal names the reason, each failure is a classified `ActionError`):

- the URL is parsed once with httpx; its host must be on the tenant's `allowed_domains`;
- the host name is resolved once, and every address it resolves to must be public or inside one
  of the tenant's `allowed_networks` (see `netguard`): loopback, private, link-local (the cloud
  metadata service), CGNAT, multicast, reserved ... are refused, so an allowed name that points
  into the workers' network cannot be used to reach it;
- the request goes to the address that was checked, with the original Host header, SNI and
  certificate check (see `pinned_http`), so DNS rebinding cannot switch it;
- one total deadline (`ToolEnv.http_timeout_s`) for connection and all reads;
- the body returned is at most 64 KiB: a plain body is cut there (`truncated`), the rest never
  downloaded. The request asks for an uncompressed body; a compressed one sent anyway is decoded
  as it streams, and fails as soon as it decodes to more than 64 KiB, without decompressing the
  rest (a gzip bomb costs us 64 KiB, not gigabytes);
- redirects are not followed (the next hop would need the same checks); a 3xx comes back as a
  result with its `location` header, for the agent to request again if it wants to.

The check (before admission) resolves the name too, so an internal address is a denial before the
task is admitted; the run resolves it again and connects to what it checked itself.
"""

from __future__ import annotations

import zlib
from email.message import Message
from ipaddress import ip_address
from typing import Annotated, Any

import httpcore
import httpx
from pydantic import Field

from governance.policy.errors import ActionError, classify_http_status
from workers.tools import netguard
from workers.tools.base import InputRejected, ToolEnv, ToolInput, ToolSpec
from workers.tools.netguard import IPAddress
from workers.tools.pinned_http import DEFAULT_PORTS, Deadline, open_get

MAX_BODY_BYTES = 64 * 1024
"""The body returned is at most this; a plain body is cut here, a compressed one may not decode
to more (see the module docstring)."""

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

REQUEST_HEADERS = (
    ("Accept", "*/*"),
    ("Accept-Encoding", "identity"),
    ("User-Agent", "celery-governance-http_get"),
)
"""Sent with every request; asking for identity keeps ordinary pages uncompressed (and cut at the
cap rather than refused)."""


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


def _resolve(url: httpx.URL) -> list[IPAddress]:
    """The addresses of the URL's host; `OSError` when it cannot be resolved."""
    port = url.port or DEFAULT_PORTS[url.scheme]
    addresses = netguard.resolve(url.raw_host.decode("ascii"), port)
    if not addresses:
        raise OSError(f"no address for {url.host!r}")
    return addresses


def checked_address(
    text: str, url: httpx.URL, addresses: list[IPAddress], env: ToolEnv
) -> IPAddress:
    """The address to connect to, when every address of the host may be reached.

    One internal address is enough to refuse: a name that mixes public and internal answers is
    not something an agent needs, and the reason is then the same whichever the resolver lists
    first.
    """
    refusals = [
        reason
        for address in addresses
        if (reason := netguard.refusal(address, env.allowed_networks)) is not None
    ]
    if refusals:
        try:
            ip_address(url.host)
            where = "address"
        except ValueError:
            listed = ", ".join(str(address) for address in addresses)
            where = f"host {url.host!r} resolves to {listed}:"
        raise InputRejected(
            f"url {text!r}: {where} {'; '.join(refusals)}, and not in the tenant's allowed_networks"
        )
    return addresses[0]


def check(inp: HttpGetInput, env: ToolEnv) -> None:
    """The URL must be http(s), its host allowed and its addresses public or allowed.

    Nothing is sent. A name that cannot be resolved now is left to the run, which fails it as
    transient: a resolver hiccup is not a reason to deny.
    """
    url = allowed_url(inp.url, env)
    try:
        addresses = _resolve(url)
    except OSError:
        return
    checked_address(inp.url, url, addresses, env)


def _charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    message = Message()
    message["content-type"] = content_type
    charset = message.get_param("charset")
    return charset if isinstance(charset, str) else None


def _decode_text(body: bytes, encoding: str | None) -> str:
    try:
        return body.decode(encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


class _Body:
    """The body as it streams in: decoded on the fly, never more than `MAX_BODY_BYTES` kept."""

    def __init__(self, what: str, content_encoding: str | None) -> None:
        self.what = what
        self.encoding = (content_encoding or "identity").strip().lower()
        self.data = bytearray()
        self.truncated = False
        self.received = 0
        self._inflater: Any = None
        self._first = True
        if self.encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif self.encoding == "deflate":
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS)
        elif self.encoding not in ("", "identity"):
            raise ActionError.permanent(
                f"{what}: unsupported content-encoding {self.encoding!r} "
                "(the request asked for an uncompressed body)"
            )

    def feed(self, chunk: bytes) -> bool:
        """Take one chunk as received; whether more should be read."""
        self.received += len(chunk)
        room = MAX_BODY_BYTES - len(self.data)
        if self._inflater is None:
            if len(chunk) > room:
                self.data += chunk[:room]
                self.truncated = True
                return False
            self.data += chunk
            return True
        self._keep(self._inflate(chunk, room + 1))
        return True

    def finish(self) -> None:
        """The body ended: whatever the decompressor still holds counts too."""
        if self._inflater is not None:
            self._keep(self._inflater.flush())

    def _inflate(self, chunk: bytes, max_length: int) -> bytes:
        # max_length: never more than one byte past the cap is decompressed from a chunk; the
        # rest of the chunk stays compressed in `unconsumed_tail` and is dropped with us.
        try:
            out: bytes = self._inflater.decompress(chunk, max_length)
        except zlib.error as exc:
            if self.encoding == "deflate" and self._first:  # a raw deflate stream, no header
                self._first = False
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._inflate(chunk, max_length)
            raise ActionError.permanent(
                f"{self.what}: the {self.encoding} body cannot be decoded: {exc}"
            ) from exc
        self._first = False
        return out

    def _keep(self, decoded: bytes) -> None:
        if len(self.data) + len(decoded) > MAX_BODY_BYTES:
            raise ActionError.permanent(
                f"{self.what}: the {self.encoding}-encoded body decodes to more than "
                f"{MAX_BODY_BYTES} bytes (the cap) after {self.received} bytes received; "
                "refused as a possible decompression bomb"
            )
        self.data += decoded


def run(inp: HttpGetInput, env: ToolEnv) -> dict[str, Any]:
    """GET the URL and return status, a few headers and the start of the body.

    4xx/5xx raise the `ActionError` that `classify_http_status` gives (429 rate-limited with the
    Retry-After, 5xx transient, other 4xx permanent); network errors, an unresolvable name and
    the deadline are transient; a body that cannot be decoded or decodes past the cap is
    permanent. An address that may not be reached raises `InputRejected`.
    """
    deadline = Deadline(env.http_timeout_s)
    url = allowed_url(inp.url, env)
    what = f"GET {url}"
    try:
        addresses = _resolve(url)
    except OSError as exc:
        raise ActionError.transient(f"{what}: cannot resolve {url.host!r}: {exc}") from exc
    address = checked_address(inp.url, url, addresses, env)
    what = f"GET {url} ({address})"
    try:
        with open_get(url, address, deadline, REQUEST_HEADERS) as response:
            headers = httpx.Headers(response.headers)
            error = classify_http_status(response.status, headers.get("retry-after"))
            if error is not None:
                raise ActionError(
                    f"{what}: {error.message}", error.kind, error.retry_after_ms, error.status
                )
            body = _Body(what, headers.get("content-encoding"))
            for chunk in response.iter_stream():
                if not body.feed(chunk):
                    break
            else:
                body.finish()
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise ActionError.transient(f"{what}: {type(exc).__name__}: {exc}") from exc
    return {
        "status": response.status,
        "headers": {name: headers[name] for name in RETURNED_HEADERS if name in headers},
        "body": _decode_text(bytes(body.data), _charset(headers.get("content-type"))),
        "truncated": body.truncated,
    }


SPEC = ToolSpec(
    name="http_get",
    side_effect_class="network.read",
    input_model=HttpGetInput,
    run=run,
    check=check,
    description="HTTP GET a URL on an allowed domain; returns status, headers and up to 64 KiB.",
)
