"""`http_get` against a real HTTP server on 127.0.0.1, and its domain allow-list.

The server is on loopback, which `http_get` refuses unless the tenant allows it: `get` allows
127.0.0.0/8 with `allowed_networks`, as a tenant of the end-to-end policy does. The address
checks themselves are in test_tools_http_get_addresses.py.
"""

from __future__ import annotations

import socket
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from governance.policy.errors import ActionError, ErrorKind
from tests.workers.loopback import LoopbackServer, Reply
from workers.tools import TOOLS, InputRejected, ToolEnv, validate_input
from workers.tools.http_get import host_allowed

LOOPBACK = (ip_network("127.0.0.0/8"),)


def get(url: str, workspace: Path, allowed: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, Any]:
    env = ToolEnv(
        workspace=workspace, allowed_domains=allowed, allowed_networks=LOOPBACK, http_timeout_s=5.0
    )
    spec = TOOLS["http_get"]
    return spec.run(validate_input(spec, {"url": url}, env), env)


def test_get_200(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/page?q=1", Reply(200, "hello", {"ETag": '"v1"', "X-Other": "x"}))
    result = get(http_server.url + "/page?q=1", workspace)
    assert result == {
        "status": 200,
        "headers": {
            "content-type": "text/plain; charset=utf-8",
            "content-length": "5",
            "etag": '"v1"',
        },
        "body": "hello",
        "truncated": False,
    }
    assert [(r.method, r.path) for r in http_server.requests] == [("GET", "/page?q=1")]


def test_body_is_truncated_at_64_kib(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/big", Reply(200, b"a" * 100_000))
    result = get(http_server.url + "/big", workspace)
    assert result["truncated"] is True
    assert result["body"] == "a" * 64 * 1024


def test_redirects_are_returned_not_followed(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/r", Reply(302, b"", {"Location": "http://example.org/"}))
    result = get(http_server.url + "/r", workspace)
    assert result["status"] == 302
    assert result["headers"]["location"] == "http://example.org/"
    assert len(http_server.requests) == 1


def test_404_is_permanent(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/missing", Reply(404, "nope"))
    with pytest.raises(ActionError, match="HTTP 404 Not Found") as info:
        get(http_server.url + "/missing", workspace)
    assert info.value.kind is ErrorKind.permanent
    assert info.value.status == 404


def test_429_is_rate_limited_with_retry_after(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/slow-down", Reply(429, "later", {"Retry-After": "1"}))
    with pytest.raises(ActionError) as info:
        get(http_server.url + "/slow-down", workspace)
    assert info.value.kind is ErrorKind.rate_limited
    assert info.value.retry_after_ms == 1000
    assert info.value.status == 429


def test_500_is_transient(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/boom", Reply(500, "boom"))
    with pytest.raises(ActionError, match="HTTP 500") as info:
        get(http_server.url + "/boom", workspace)
    assert info.value.kind is ErrorKind.transient


def test_connection_refused_is_transient(workspace: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ActionError, match="ConnectError") as info:
        get(f"http://127.0.0.1:{port}/", workspace)
    assert info.value.kind is ErrorKind.transient


def test_read_timeout_is_transient(http_server: LoopbackServer, workspace: Path) -> None:
    http_server.route("GET", "/hang", Reply(200, "late", delay_s=5))
    env = ToolEnv(
        workspace=workspace,
        allowed_domains=("127.0.0.1",),
        allowed_networks=LOOPBACK,
        http_timeout_s=0.2,
    )
    spec = TOOLS["http_get"]
    with pytest.raises(ActionError, match=r"ReadTimeout: the total deadline of 0\.2 s") as info:
        spec.run(validate_input(spec, {"url": http_server.url + "/hang"}, env), env)
    assert info.value.kind is ErrorKind.transient


def test_domain_not_allowed_is_rejected_without_a_request(
    http_server: LoopbackServer, workspace: Path
) -> None:
    http_server.route("GET", "/", Reply(200, "hi"))
    with pytest.raises(InputRejected, match="domain 'localhost' is not in the allowed domains"):
        get(f"http://localhost:{http_server.port}/", workspace, allowed=("127.0.0.1",))
    with pytest.raises(InputRejected, match=r"domain 'example\.org' is not in the allowed domains"):
        get("https://example.org/", workspace, allowed=("127.0.0.1", "example.com"))
    with pytest.raises(InputRejected, match="not in the allowed domains"):
        get(http_server.url + "/", workspace, allowed=())
    assert http_server.requests == []


def test_run_checks_the_domain_too(workspace: Path) -> None:
    """Even a caller that skips `validate_input` cannot reach a domain off the list."""
    spec = TOOLS["http_get"]
    env = ToolEnv(workspace=workspace, allowed_domains=("example.com",))
    with pytest.raises(InputRejected):
        spec.run(spec.input_model(url="http://example.org/"), env)


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1/x", "http:///path"]
)
def test_only_http_urls_with_a_host(url: str, workspace: Path) -> None:
    with pytest.raises(InputRejected):
        get(url, workspace)


def test_subdomain_rule() -> None:
    allowed = ("example.com", "API.Partner.io.")
    assert host_allowed("example.com", allowed)
    assert host_allowed("api.example.com", allowed)
    assert host_allowed("a.b.example.com", allowed)
    assert host_allowed("EXAMPLE.COM.", allowed)
    assert host_allowed("api.partner.io", allowed)
    assert not host_allowed("partner.io", allowed)
    assert not host_allowed("evilexample.com", allowed)
    assert not host_allowed("example.com.evil.net", allowed)
    assert not host_allowed("example.com", ())


def test_userinfo_does_not_fool_the_allow_list(workspace: Path) -> None:
    with pytest.raises(InputRejected, match=r"domain 'evil\.net'"):
        get("http://example.com@evil.net/", workspace, allowed=("example.com",))
