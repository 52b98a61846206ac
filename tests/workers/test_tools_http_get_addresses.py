"""`http_get` is not a request forgery into the workers' network, with real loopback servers.

Internal addresses are refused (with the address and the reason) unless the tenant allows their
network; the connection goes to the address that was checked; one deadline covers the whole
request; a compressed body may not decode past the cap.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest

from governance.policy.errors import ActionError, ErrorKind
from tests.workers.loopback import LoopbackServer, Reply
from workers.tools import TOOLS, InputRejected, ToolEnv, netguard, validate_input
from workers.tools.http_get import MAX_BODY_BYTES
from workers.tools.netguard import IPAddress, internal_reason, refusal
from workers.tools.pinned_http import Deadline, open_get

LOOPBACK = (ip_network("127.0.0.0/8"),)


def get(
    url: str,
    workspace: Path,
    domains: tuple[str, ...] = ("127.0.0.1",),
    networks: tuple[Any, ...] = LOOPBACK,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    env = ToolEnv(
        workspace=workspace,
        allowed_domains=domains,
        allowed_networks=networks,
        http_timeout_s=timeout_s,
    )
    spec = TOOLS["http_get"]
    return spec.run(validate_input(spec, {"url": url}, env), env)


def fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[str]:
    """Make `netguard.resolve` answer `answers` in turn (the last one repeats); returns the log."""
    queries: list[str] = []
    queue = [[ip_address(a) for a in answer] for answer in answers]

    def resolve(host: str, port: int) -> list[IPAddress]:
        queries.append(host)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    monkeypatch.setattr(netguard, "resolve", resolve)
    return queries


# --- which addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address (127.0.0.0/8)"),
        ("127.8.9.10", "a loopback address (127.0.0.0/8)"),
        ("10.1.2.3", "a private address (RFC 1918) (10.0.0.0/8)"),
        ("172.20.0.5", "a private address (RFC 1918) (172.16.0.0/12)"),
        ("192.168.1.1", "a private address (RFC 1918) (192.168.0.0/16)"),
        ("100.64.0.1", "a carrier-grade NAT address (RFC 6598) (100.64.0.0/10)"),
        ("169.254.169.254", "cloud metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "a multicast address"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "a reserved address"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "a loopback address (::1/128)"),
        ("::", "the unspecified address"),
        ("fd00::1", "a unique local address (ULA) (fc00::/7)"),
        ("fe80::1", "a link-local address (fe80::/10)"),
        ("ff02::1", "a multicast address"),
        ("::ffff:127.0.0.1", "embedding 127.0.0.1, a loopback address"),
        ("::ffff:169.254.169.254", "embedding 169.254.169.254, a link-local address"),
        ("::ffff:8.8.8.8", "an IPv4-mapped address"),
        ("2002:a00:1::", "embedding 10.0.0.1, a private address"),
        ("64:ff9b::a9fe:a9fe", "embedding 169.254.169.254, a link-local address"),
        ("64:ff9b:1::1", "a local-use NAT64 address"),
        ("2001:db8::1", "a documentation address"),
    ],
)
def test_internal_addresses_are_named(address: str, reason: str) -> None:
    found = internal_reason(ip_address(address))
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert internal_reason(ip_address(address)) is None
    assert refusal(ip_address(address), ()) is None


def test_allowed_networks_lift_the_refusal() -> None:
    lan = (ip_network("10.20.0.0/16"),)
    assert refusal(ip_address("10.20.3.4"), lan) is None
    assert refusal(ip_address("::ffff:10.20.3.4"), lan) is None  # the same address on the wire
    assert (
        refusal(ip_address("10.21.0.1"), lan)
        == "10.21.0.1 is a private address (RFC 1918) (10.0.0.0/8)"
    )
    assert refusal(ip_address("127.0.0.1"), lan) is not None


# --- refusals through the tool ------------------------------------------------------------------


def test_an_allowed_name_that_resolves_to_loopback_is_denied(
    http_server: LoopbackServer, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    http_server.route("GET", "/", Reply(200, "internal"))
    fake_dns(monkeypatch, ["127.0.0.1"])
    env = ToolEnv(workspace=workspace, allowed_domains=("example.com",))
    spec = TOOLS["http_get"]
    with pytest.raises(InputRejected) as info:
        validate_input(spec, {"url": f"http://internal.example.com:{http_server.port}/"}, env)
    assert info.value.reason == (
        f"url 'http://internal.example.com:{http_server.port}/': host 'internal.example.com' "
        "resolves to 127.0.0.1: 127.0.0.1 is a loopback address (127.0.0.0/8), and not in the "
        "tenant's allowed_networks"
    )
    assert http_server.requests == []


def test_localhost_is_denied_with_the_real_resolver(
    http_server: LoopbackServer, workspace: Path
) -> None:
    http_server.route("GET", "/", Reply(200, "internal"))
    with pytest.raises(InputRejected, match=r"host 'localhost' resolves to .*a loopback address"):
        get(f"http://localhost:{http_server.port}/", workspace, ("localhost",), networks=())
    assert http_server.requests == []


def test_with_allowed_networks_the_name_is_fetched_from_the_checked_address(
    http_server: LoopbackServer, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.test` names never resolve in real DNS: the request can only have used the address."""
    http_server.route("GET", "/doc", Reply(200, "fetched"))
    queries = fake_dns(monkeypatch, ["127.0.0.1"])
    url = f"http://svc.internal.test:{http_server.port}/doc"
    result = get(url, workspace, ("internal.test",))
    assert result["status"] == 200
    assert result["body"] == "fetched"
    [request] = http_server.requests
    assert request.headers["host"] == f"svc.internal.test:{http_server.port}"
    assert request.headers["accept-encoding"] == "identity"
    assert queries == ["svc.internal.test", "svc.internal.test"]  # the check, then the run


def test_dns_rebinding_between_check_and_run_is_refused(
    http_server: LoopbackServer, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public when checked before admission, loopback when run: the run checks its own answer."""
    http_server.route("GET", "/", Reply(200, "internal"))
    fake_dns(monkeypatch, ["93.184.215.14"], ["127.0.0.1"])
    env = ToolEnv(workspace=workspace, allowed_domains=("rebind.test",))
    spec = TOOLS["http_get"]
    checked = validate_input(spec, {"url": f"http://rebind.test:{http_server.port}/"}, env)
    with pytest.raises(
        InputRejected, match=r"resolves to 127\.0\.0\.1: 127\.0\.0\.1 is a loopback"
    ):
        spec.run(checked, env)
    assert http_server.requests == []


def test_one_internal_answer_among_public_ones_is_enough_to_refuse(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, ["93.184.215.14", "10.0.0.7"])
    with pytest.raises(
        InputRejected, match=r"resolves to 93\.184\.215\.14, 10\.0\.0\.7: 10\.0\.0\.7"
    ):
        get("http://mixed.example.com/", workspace, ("example.com",), networks=())


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
    ],
)
def test_the_metadata_address_is_refused(url: str, workspace: Path) -> None:
    host = httpx.URL(url).host
    with pytest.raises(InputRejected, match=r"address .* is an? .*link-local|unique local") as info:
        get(url, workspace, (host,), networks=LOOPBACK)
    assert "allowed_networks" in info.value.reason


def test_a_name_resolving_to_the_metadata_address_is_refused(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, ["169.254.169.254"])
    with pytest.raises(InputRejected, match=r"169\.254\.169\.254 is a link-local address"):
        get("http://metadata.example.com/", workspace, ("example.com",))


def test_an_unresolvable_name_is_transient_at_run_time(workspace: Path) -> None:
    env = ToolEnv(workspace=workspace, allowed_domains=("nowhere.invalid",))
    spec = TOOLS["http_get"]
    checked = validate_input(spec, {"url": "http://nowhere.invalid/"}, env)  # not a denial
    with pytest.raises(ActionError, match=r"cannot resolve 'nowhere\.invalid'") as info:
        spec.run(checked, env)
    assert info.value.kind is ErrorKind.transient


# --- one deadline ---------------------------------------------------------------------------


def test_a_slow_drip_server_fails_at_the_total_deadline(
    http_server: LoopbackServer, workspace: Path
) -> None:
    """One byte every 0.2 s: each read is quick, the whole response would take a minute."""
    http_server.route("GET", "/drip", Reply(200, b"x" * 300, drip_s=0.2))
    started = time.monotonic()
    with pytest.raises(ActionError, match=r"the total deadline of 1 s was exceeded") as info:
        get(http_server.url + "/drip", workspace, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert info.value.kind is ErrorKind.transient
    assert 0.9 <= elapsed < 2.5


def test_the_deadline_covers_the_tls_handshake(workspace: Path) -> None:
    """A server that accepts and never speaks TLS: the handshake ends at the deadline too."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(ActionError, match=r"the total deadline of 0\.5 s was exceeded"):
            get(f"https://127.0.0.1:{listener.getsockname()[1]}/", workspace, timeout_s=0.5)
        assert time.monotonic() - started < 2


# --- the body cap -----------------------------------------------------------------------------


def gzip_bomb(decoded_bytes: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(decoded_bytes // len(block))]
    return b"".join([*parts, compressor.flush()])


def test_a_gzip_bomb_fails_at_the_cap_while_reading(
    http_server: LoopbackServer, workspace: Path
) -> None:
    bomb = gzip_bomb(256 * 1024 * 1024)  # 256 MiB of zeros in about 250 KB
    http_server.route("GET", "/bomb", Reply(200, bomb, {"Content-Encoding": "gzip"}))
    with pytest.raises(ActionError, match="decodes to more than 65536 bytes") as info:
        get(http_server.url + "/bomb", workspace)
    assert info.value.kind is ErrorKind.permanent
    assert "decompression bomb" in info.value.message
    received = int(info.value.message.split(" after ")[1].split(" bytes")[0])
    assert received < len(bomb), "it stopped while reading, not after downloading it all"


def test_a_small_compressed_body_is_decoded(http_server: LoopbackServer, workspace: Path) -> None:
    text = "hello " * 1000
    http_server.route(
        "GET", "/gz", Reply(200, gzip.compress(text.encode()), {"Content-Encoding": "gzip"})
    )
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw_deflate.compress(text.encode()) + raw_deflate.flush()
    http_server.route("GET", "/raw", Reply(200, deflated, {"Content-Encoding": "deflate"}))
    http_server.route(
        "GET", "/zlib", Reply(200, zlib.compress(text.encode()), {"Content-Encoding": "deflate"})
    )
    for path in ("/gz", "/raw", "/zlib"):
        result = get(http_server.url + path, workspace)
        assert result["body"] == text, path
        assert result["truncated"] is False


def test_a_compressed_body_just_over_the_cap_fails(
    http_server: LoopbackServer, workspace: Path
) -> None:
    http_server.route(
        "GET",
        "/big",
        Reply(200, gzip.compress(b"a" * (MAX_BODY_BYTES + 1)), {"Content-Encoding": "gzip"}),
    )
    with pytest.raises(ActionError, match="decodes to more than"):
        get(http_server.url + "/big", workspace)
    http_server.route(
        "GET",
        "/fits",
        Reply(200, gzip.compress(b"a" * MAX_BODY_BYTES), {"Content-Encoding": "gzip"}),
    )
    assert len(get(http_server.url + "/fits", workspace)["body"]) == MAX_BODY_BYTES


def test_an_unknown_or_broken_encoding_is_permanent(
    http_server: LoopbackServer, workspace: Path
) -> None:
    http_server.route("GET", "/br", Reply(200, b"\x1b\x00", {"Content-Encoding": "br"}))
    with pytest.raises(ActionError, match="unsupported content-encoding 'br'") as info:
        get(http_server.url + "/br", workspace)
    assert info.value.kind is ErrorKind.permanent
    http_server.route("GET", "/bad", Reply(200, b"not gzip at all", {"Content-Encoding": "gzip"}))
    with pytest.raises(ActionError, match="the gzip body cannot be decoded") as info:
        get(http_server.url + "/bad", workspace)
    assert info.value.kind is ErrorKind.permanent


# --- https to the checked address -------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, list[str | None]]]:
    """An https server on 127.0.0.1 with a self-signed certificate for `pinned.test`.

    Yields its port, the certificate (to trust it) and the SNI names it was sent.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=pinned.test"),
            *("-addext", "subjectAltName=DNS:pinned.test"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = record_sni
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    request = tls.recv(65536)
                    host = [
                        line for line in request.split(b"\r\n") if line.lower().startswith(b"host:")
                    ]
                    body = b"host=" + host[0].split(b":", 1)[1].strip()
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (len(body), body)
                    )
            except (OSError, IndexError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], cert, names
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_https_sends_sni_and_verifies_the_original_host_name(
    tls_server: tuple[int, Path, list[str | None]],
) -> None:
    port, cert, names = tls_server
    trusting = ssl.create_default_context(cafile=str(cert))
    url = httpx.URL(f"https://pinned.test:{port}/")
    with open_get(url, ip_address("127.0.0.1"), Deadline(5), ssl_context=trusting) as response:
        body = response.read()
    assert response.status == 200
    assert body == f"host=pinned.test:{port}".encode()
    assert names == ["pinned.test"]


def test_https_certificates_are_verified_by_the_tool(
    tls_server: tuple[int, Path, list[str | None]],
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, _cert, names = tls_server
    fake_dns(monkeypatch, ["127.0.0.1"])
    with pytest.raises(ActionError, match="CERTIFICATE_VERIFY_FAILED") as info:
        get(f"https://pinned.test:{port}/", workspace, ("pinned.test",))
    assert info.value.kind is ErrorKind.transient
    assert names == ["pinned.test"]
