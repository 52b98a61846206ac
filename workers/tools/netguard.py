"""Which IP addresses network tools may connect to: public ones, and the tenant's allowed networks.

A host name on the tenant's domain allow-list is not enough: `allowed.example` may resolve to
127.0.0.1, to the cloud metadata service at 169.254.169.254 or to the state Redis on a private
network. So the name is resolved once (`resolve`), every address it resolves to is checked
(`refusal`), and the tool connects to the address that was checked, never to the name again.

Internal addresses are refused unless one of the tenant's `allowed_networks` contains them. Each
refusal names the address and the range it fell in, e.g. "127.0.0.1 is a loopback address
(127.0.0.0/8)". The explicit list below gives the reasons; the `ipaddress` properties (private,
loopback, link-local, multicast, unspecified, reserved, not global) are a safety net for anything
the list misses.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

__all__ = [
    "BLOCKED_NETWORKS",
    "IPAddress",
    "IPNetwork",
    "internal_reason",
    "refusal",
    "resolve",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ip_network(cidr), what) for cidr, what in rows)


BLOCKED_NETWORKS = _table(
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a carrier-grade NAT address (RFC 6598)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (this includes cloud metadata, 169.254.169.254)"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address (TEST-NET-1)"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address (TEST-NET-2)"),
    ("203.0.113.0/24", "a documentation address (TEST-NET-3)"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address (this includes broadcast, 255.255.255.255)"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("::ffff:0:0/96", "an IPv4-mapped address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("::/8", "a reserved address (this includes IPv4-compatible addresses)"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address (this includes Teredo)"),
    ("2001:db8::/32", "a documentation address"),
    ("2002::/16", "a 6to4 address (it embeds an IPv4 address)"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment routing (SRv6) address"),
    ("fc00::/7", "a unique local address (ULA)"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("ff00::/8", "a multicast address"),
)
"""Ranges an agent's request must never reach by default, each with what it is."""

NAT64 = ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix: an address in it is the IPv4 address it embeds, judged as such
(on an IPv6-only network, DNS64 answers with these for every public IPv4-only site)."""

_PROPERTIES = (
    ("is_loopback", "a loopback address"),
    ("is_private", "a private address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_unspecified", "an unspecified address"),
    ("is_reserved", "a reserved address"),
)


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, NAT64, 6to4, Teredo), if any."""
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def internal_reason(address: IPAddress) -> str | None:
    """What makes `address` internal ("a loopback address (127.0.0.0/8)"), or None if public."""
    if isinstance(address, IPv6Address):
        embedded = _embedded_ipv4(address)
        inner = internal_reason(embedded) if embedded is not None else None
        if inner is not None:
            return f"an IPv6 address embedding {embedded}, {inner}"
        if address in NAT64:
            return None
    for network, what in BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return f"{what} ({network})"
    for name, what in _PROPERTIES:
        if getattr(address, name):
            return what
    if not address.is_global:
        return "not a globally routable address"
    return None


def _allowed(address: IPAddress, allowed_networks: Iterable[IPNetwork]) -> bool:
    candidates: list[IPAddress] = [address]
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)  # ::ffff:10.0.0.1 is 10.0.0.1 on the wire
    return any(
        candidate.version == network.version and candidate in network
        for candidate in candidates
        for network in allowed_networks
    )


def refusal(address: IPAddress, allowed_networks: Sequence[IPNetwork]) -> str | None:
    """Why a tool may not connect to `address`, or None when it may.

    Public addresses are allowed; internal ones only inside one of `allowed_networks`.
    """
    if _allowed(address, allowed_networks):
        return None
    reason = internal_reason(address)
    if reason is None:
        return None
    return f"{address} is {reason}"


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to for a TCP connection, in the resolver's order.

    An IP literal resolves to itself without a DNS query. Raises `OSError` (`socket.gaierror`)
    when the name cannot be resolved.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ip_address(str(sockaddr[0]))
        if address not in addresses:
            addresses.append(address)
    return addresses
