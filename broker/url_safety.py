"""Checks that keep webhook deliveries away from internal services (SSRF).

A URL passes only if it is http or https and every address its host resolves to is a
public unicast address. Deliveries check again at send time and connect to the address
that was checked, so a DNS record changed after registration cannot point a delivery
at an internal service.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")
# Longest URL accepted, in characters.
MAX_URL_CHARS = 2048
# Cloud instance metadata services, rejected even when private addresses are allowed:
# AWS, GCP, Azure and others (169.254.169.254), AWS over IPv6 (fd00:ec2::254) and
# Alibaba Cloud (100.100.100.200).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text) for text in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


class UnsafeUrl(ValueError):
    """The URL may not receive webhooks, for the reason in the message."""


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the checks, with the addresses its host resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


# Well-known NAT64 prefix (RFC 6052): its last 32 bits are an IPv4 address.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def address_problem(address: IPAddress, allow_private: bool) -> str | None:
    """Return why ``address`` may not receive webhooks, or None if it may."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return address_problem(embedded, allow_private)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_loopback:
        return None if allow_private else "a loopback address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return None if allow_private else "a private address"
    return None


def parse_url(url: str) -> tuple[str, str, int]:
    """Return the scheme, host and port of a webhook URL, or raise UnsafeUrl."""
    if not isinstance(url, str) or not url:
        raise UnsafeUrl("The URL must be a non-empty string.")
    if len(url) > MAX_URL_CHARS:
        raise UnsafeUrl(f"The URL has {len(url)} characters; the limit is {MAX_URL_CHARS}.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"The URL is invalid: {exc}.") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeUrl(f"The URL scheme must be http or https, not '{parts.scheme}'.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("The URL may not contain a user name or password.")
    host = parts.hostname
    if not host:
        raise UnsafeUrl("The URL has no host.")
    return scheme, host, port or (443 if scheme == "https" else 80)


def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    """Resolve ``host`` to its addresses (blocking DNS), or raise UnsafeUrl."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"The host '{host}' could not be resolved: {exc}.") from exc
    addresses = []
    for info in infos:
        # Drop an IPv6 zone ("fe80::1%eth0"), because the address is checked without it.
        text = str(info[4][0]).split("%", 1)[0]
        address = ipaddress.ip_address(text)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeUrl(f"The host '{host}' has no address.")
    return tuple(addresses)


def check_url(url: str, *, allow_private: bool) -> CheckedUrl:
    """Check a webhook URL and resolve it, raising UnsafeUrl that names the problem.

    Every resolved address must pass, because a client may connect to any of them.
    ``allow_private`` admits loopback and private ranges (local demos and tests);
    metadata, link-local, multicast, unspecified and reserved addresses never pass.
    """
    scheme, host, port = parse_url(url)
    addresses = resolve(host, port)
    for address in addresses:
        problem = address_problem(address, allow_private)
        if problem is not None:
            raise UnsafeUrl(
                f"The URL's host '{host}' resolves to {address}, {problem}, which may "
                "not receive webhooks. Use a public http(s) URL."
            )
    return CheckedUrl(url, scheme, host, port, addresses)
