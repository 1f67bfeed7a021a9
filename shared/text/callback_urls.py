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
import re
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

MAX_LENGTH = 2048
# A host name as DNS spells it on the wire (an international name in its xn-- form): anything
# else is refused when accepted rather than failing in the resolver or the Host header later.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,254}}$)(?:{_LABEL}\.)*{_LABEL}\.?")

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
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or port == 0:
        return None
    if literal_address(host) is None and not _HOST_NAME.fullmatch(host):
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
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address carried inside an IPv6 one is judged as itself: ::ffff:127.0.0.1
        # (mapped) and 2002:7f00:1::/48 (6to4) reach 127.0.0.1.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return refused_address(embedded, allowed)
        if address.is_site_local:  # fec0::/10, deprecated but still routed inside some sites
            return "site-local"
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
