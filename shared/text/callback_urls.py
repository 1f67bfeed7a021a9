"""Which statusCallback URLs the service will POST to.

A callback URL is the caller's, so it must not become the caller's way into the network the
service runs in (SSRF): an address that is not globally routable (private, loopback,
link-local, shared, reserved, multicast, unspecified) is refused unless the operator allows
its network (SMSD_STATUS_CALLBACK_ALLOWED_NETWORKS). A literal address is judged when the
URL is accepted; a name is judged at every delivery, on every address it resolves to, and the
POST then goes to the address that was judged, so a name that changes its answer in between
(DNS rebinding) cannot slip past."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

MAX_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_callback_url(url: str) -> SplitResult | None:
    """The URL's parts if it is one we can POST to (absolute http or https, a host, a valid
    port, no whitespace or control characters), else None."""
    if len(url) > MAX_LENGTH or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        return None
    return parts


@lru_cache(maxsize=8)
def allowed_networks(spec: str) -> tuple[IPNetwork, ...]:
    """SMSD_STATUS_CALLBACK_ALLOWED_NETWORKS as networks; raises ValueError on a bad one."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()
    )


def refused_address(address: IPAddress, allowed: tuple[IPNetwork, ...]) -> str | None:
    """Why the service will not POST to `address` ("loopback", "private", ...), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(address in network for network in allowed if network.version == address.version):
        return None
    for reason, flagged in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flagged:
            return reason
    return None if address.is_global else "not global"


def literal_address(host: str) -> IPAddress | None:
    """The host as an IP address if it is written as one (`10.0.0.1`, `[::1]`), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def refused_url(url: str, allowed: tuple[IPNetwork, ...]) -> str | None:
    """What is wrong with a statusCallback as given (judged without DNS): None when it may be
    accepted, else a short reason. `localhost` is loopback by definition (RFC 6761)."""
    parts = parse_callback_url(url)
    if parts is None or parts.hostname is None:
        return "not an absolute http or https URL"
    host = parts.hostname.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return refused_address(ipaddress.ip_address("127.0.0.1"), allowed)
    address = literal_address(host)
    return None if address is None else refused_address(address, allowed)


def shown_url(url: str) -> str:
    """The URL as it may be shown or logged: a password in it replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()
