"""Whether a failed HTTP call may have reached the provider, for the adapters' transports:
`requests` (under the Twilio and Vonage SDKs) and `httpx` (the simulator adapter).

A send that provably never reached the provider is transient (try again, fail over); one that
may have reached it is in doubt: the provider may have taken it, and a blind retry could reach
the handset twice. Only failures that happen before a byte of the request is written are
transient: connecting (refused, DNS, connect timeout) and the TLS handshake. Anything later —
a read timeout, a reset or a close before the answer, a write that failed part-way — is in
doubt, and so is anything not recognised (the safe side: in doubt is resolved, never guessed).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import aiohttp
import httpx
import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError

from shared.providers.interface import InDoubtProviderError, ProviderError, TransientProviderError

# Errors reading or closing an established TLS session: the request may have gone out.
_TLS_AFTER_HANDSHAKE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: requests keeps urllib3's error in args[0] (a MaxRetryError,
    whose `reason` is the real one), urllib3 in `reason` or args, Python in cause/context."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked += list(current.args)
        todo += [item for item in linked if isinstance(item, BaseException)]


def _before_request(exc: requests.RequestException) -> bool:
    """Whether a requests error provably happened before the request was written."""
    chain = list(_chain(exc))
    if any(isinstance(item, ProtocolError) for item in chain):
        return False  # the connection broke while the request or its answer was on the wire
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        # urllib3 names any TLS error an SSLError, also one that ends an established
        # session; only a handshake error (certificate, protocol) proves nothing was sent.
        tls = [item for item in chain if isinstance(item, ssl.SSLError)]
        return bool(tls) and not any(isinstance(item, _TLS_AFTER_HANDSHAKE) for item in tls)
    # NewConnectionError covers refused connections and NameResolutionError (DNS);
    # ConnectTimeoutError a connect that never completed.
    return any(isinstance(item, NewConnectionError | ConnectTimeoutError) for item in chain)


def classify_requests_error(exc: requests.RequestException) -> ProviderError:
    """A `requests` failure (no HTTP answer) as transient or in doubt."""
    text = str(exc) or type(exc).__name__
    if _before_request(exc):
        return TransientProviderError("connection", text)
    if isinstance(exc, requests.Timeout):
        return InDoubtProviderError("timeout", text)
    return InDoubtProviderError("connection", text)


def classify_httpx_error(exc: httpx.TransportError) -> ProviderError:
    """An `httpx` failure (no HTTP answer) as transient or in doubt: httpx names the
    phase itself (ConnectError covers refused, DNS and the TLS handshake)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return TransientProviderError("connection", text)
    if isinstance(exc, httpx.TimeoutException):  # ReadTimeout, WriteTimeout
        return InDoubtProviderError("timeout", text)
    # ReadError, WriteError, RemoteProtocolError, and anything else after connecting.
    return InDoubtProviderError("connection", text)


def classify_aiohttp_error(exc: BaseException) -> ProviderError:
    """An `aiohttp` failure (no HTTP answer) as transient or in doubt: a connection that was
    never made (refused, DNS, TLS, a connect timeout) sent nothing; a timeout or a break after
    connecting may have delivered the request."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return TransientProviderError("connection", text)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return InDoubtProviderError("timeout", text)
    return InDoubtProviderError("connection", text)
