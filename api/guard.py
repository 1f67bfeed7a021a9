"""What the edge refuses before any account is looked at: key guessing and unusable text.

Key guessing: every 401 from a client address counts; `SMSD_AUTH_FAILURE_LIMIT` of them within
`SMSD_AUTH_FAILURE_WINDOW` block the address for `SMSD_AUTH_BLOCK_TIME`. A blocked address gets
429 for every Interact request, with the right key too: if the right key still passed, the
different answer would tell a guesser when the guess was right. Other addresses, the same
account's included, are not affected. With Redis the count is shared by every API process and
blocks reach them all at once (published, so checking a request costs no round trip);
without it (`make run`) each process counts for itself."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import time
from collections.abc import Iterable
from typing import Any, Protocol, cast

import redis.asyncio
import structlog
from litestar import Request
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from redis.exceptions import RedisError

from shared.core.errors import InvalidParameter
from shared.core.settings import Settings

log = structlog.get_logger(__name__)

INTERACT_PREFIX = "/interact/"
SOAP_PATH = "/interact/version/2/agent/soap"
AUTH_FAILED = "smsd.auth_failed"  # set in the scope by whoever answered 401
MAX_TRACKED = 100_000  # addresses kept in memory: an attacker with many cannot grow it further

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def note_auth_failure(scope: Scope) -> None:
    """Counts this request as a failed authentication (its answer is a 401 or a SOAP fault)."""
    cast(dict[str, Any], scope)[AUTH_FAILED] = True


def throttled_text(seconds: int) -> str:
    return (
        "Too many requests with missing or wrong credentials from this address; "
        f"retry after {seconds} seconds"
    )


# Client addresses


class ClientAddress:
    """The address a request comes from: the socket peer, or behind trusted proxies the
    right-most address in the proxy header that is not one of them (what a client writes
    into the header itself sits further left and is never believed)."""

    def __init__(self, header: str | None, proxies: str) -> None:
        self._header = header.lower().encode() if header else None
        self._proxies = [
            ipaddress.ip_network(item.strip(), strict=False)
            for item in proxies.split(",")
            if item.strip()
        ]

    def of(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if self._header is None or not self._trusted(peer):
            return _bucket(peer)
        hops = [
            hop.strip()
            for name, value in scope["headers"]
            if name == self._header
            for hop in value.decode("latin-1").split(",")
        ]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return _bucket(hop)
        return _bucket(hops[0] if hops else peer)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)


@functools.lru_cache(maxsize=4096)
def _bucket(address: str) -> str:
    """IPv6 clients get a /64 each, so one machine cannot rotate through its own addresses.
    (Cached: parsing an address on every request costs more than the rest of the guard.)"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a test client, a mangled header): still a bucket
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


# Counting failures


class Blocks:
    """Blocked addresses in this process: checked on every request, so only a dict lookup."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def left(self, address: str) -> float:
        until = self._until.get(address)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            self._until.pop(address, None)
            return 0.0
        return left

    def block(self, address: str, seconds: float) -> None:
        if len(self._until) >= MAX_TRACKED:
            _forget_expired(self._until, time.monotonic())
        self._until[address] = time.monotonic() + seconds


def _forget_expired(entries: dict[str, float], now: float) -> None:
    for key in [key for key, until in entries.items() if until <= now]:
        del entries[key]
    while len(entries) >= MAX_TRACKED:  # all still live: the oldest go first
        del entries[next(iter(entries))]


class FailureCounter(Protocol):
    async def failed(self, address: str) -> bool:
        """Counts one failure; True when it blocks the address."""
        ...

    async def start(self, blocks: Blocks) -> None: ...

    async def close(self) -> None: ...


class LocalFailures:
    """One process's count (a fixed window per address, from its first failure)."""

    def __init__(self, settings: Settings) -> None:
        self._limit = settings.auth_failure_limit
        self._window = settings.auth_failure_window.total_seconds()
        self._windows: dict[str, tuple[float, int]] = {}

    async def failed(self, address: str) -> bool:
        now = time.monotonic()
        started, count = self._windows.get(address, (now, 0))
        if now - started >= self._window:
            started, count = now, 0
        if count + 1 >= self._limit:
            self._windows.pop(address, None)
            return True
        if address not in self._windows and len(self._windows) >= MAX_TRACKED:
            ends = {key: begun + self._window for key, (begun, _n) in self._windows.items()}
            _forget_expired(ends, now)
            self._windows = {key: self._windows[key] for key in ends}
        self._windows[address] = (started, count + 1)
        return False

    async def start(self, blocks: Blocks) -> None:
        return None

    async def close(self) -> None:
        return None


BLOCKS_CHANNEL = "smsd:authguard:blocks"
_FAILURES_KEY = "smsd:authguard:failures:{}"
_BLOCK_KEY = "smsd:authguard:block:{}"


class RedisFailures:
    """The count in Redis, shared by every API process; blocks are published to all of them.

    A process that starts later reads the blocks still in force. When Redis cannot be
    reached, this process counts alone until it can."""

    def __init__(self, url: str, settings: Settings) -> None:
        self._redis = redis.asyncio.Redis.from_url(url)
        self._window = _whole_seconds(settings.auth_failure_window.total_seconds())
        self._block_seconds = _whole_seconds(settings.auth_block_time.total_seconds())
        self._limit = settings.auth_failure_limit
        self._fallback = LocalFailures(settings)
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    async def failed(self, address: str) -> bool:
        key = _FAILURES_KEY.format(address)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._window, nx=True)
                count = int((await pipe.execute())[0])
            if count < self._limit:
                return False
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_BLOCK_KEY.format(address), 1, ex=self._block_seconds)
                pipe.delete(key)
                pipe.publish(BLOCKS_CHANNEL, f"{self._block_seconds} {address}")
                await pipe.execute()
        except RedisError as exc:
            log.warning("auth.throttle_unshared", error=type(exc).__name__)
            return await self._fallback.failed(address)
        return True

    async def start(self, blocks: Blocks) -> None:
        self._listener = asyncio.create_task(self._listen(blocks))

    async def close(self) -> None:
        self._closing = True
        # redis-py sometimes swallows a cancellation that lands while it connects: cancel
        # again until the listener has really stopped (bounded, whatever it does).
        for _ in range(40):
            if self._listener is None or self._listener.done():
                break
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=0.05)
        await self._redis.aclose()

    async def _listen(self, blocks: Blocks) -> None:
        while not self._closing:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(BLOCKS_CHANNEL)
                    # Subscribed first, then read: a block made in between is seen either way.
                    await self._load(blocks)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            seconds, _, address = message["data"].decode().partition(" ")
                            blocks.block(address, float(seconds))
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                log.warning("auth.throttle_listener_lost", error=type(exc).__name__)
                await asyncio.sleep(1)

    async def _load(self, blocks: Blocks) -> None:
        prefix = _BLOCK_KEY.format("")
        async for key in self._redis.scan_iter(match=prefix + "*", count=1000):
            ttl = await self._redis.pttl(key)
            if ttl > 0:
                blocks.block(key.decode()[len(prefix) :], ttl / 1000)


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def failure_counter(settings: Settings) -> FailureCounter:
    """Redis when there is one to share, memory otherwise (as shared.providers.throttle decides)."""
    if settings.redis_url:
        return RedisFailures(settings.redis_url, settings)
    return LocalFailures(settings)


class KeyGuessingGuard:
    """ASGI middleware for the Interact paths: refuses blocked addresses before anything else
    happens, and counts the failures the handlers note with `note_auth_failure`."""

    def __init__(self, settings: Settings) -> None:
        self.address = ClientAddress(settings.trusted_proxy_header, settings.trusted_proxies)
        self.blocks = Blocks()
        self.counter = failure_counter(settings)
        self.block_seconds = settings.auth_block_time.total_seconds()

    async def start(self) -> None:
        await self.counter.start(self.blocks)

    async def close(self) -> None:
        await self.counter.close()

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not scope["path"].startswith(INTERACT_PREFIX):
                await app(scope, receive, send)
                return
            address = self.address.of(scope)
            left = self.blocks.left(address)
            if left > 0:
                await _too_many(scope, send, math.ceil(left))
                return
            await app(scope, receive, self.counting(scope, address, send))

        return guarded

    def counting(self, scope: Scope, address: str, send: Send) -> Send:
        """`send`, counting the answer against `address` if its handler noted a failed
        authentication (api/fast_send.py uses it too)."""

        async def count_failures(message: Message) -> None:
            # Counted before the answer leaves, so a client's next request already sees it.
            if (
                message["type"] == "http.response.start"
                and scope.get(AUTH_FAILED)
                and await self.counter.failed(address)
            ):
                self.blocks.block(address, self.block_seconds)
                log.warning("auth.blocked", client=address, seconds=self.block_seconds)
            await send(message)

        return count_failures


async def _too_many(scope: Scope, send: Send, seconds: int) -> None:
    text = throttled_text(seconds)
    if scope["path"] == SOAP_PATH:
        from api.soap import fault

        body, media_type = fault("SOAP-ENV:Client", text).encode(), b"text/xml; charset=utf-8"
    else:
        body, media_type = text.encode(), b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", media_type),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(seconds).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


# Unusable text in paths, queries and headers


# What each path parameter and header is called in the seed's texts. A campaign id or short
# link code with a NUL stays the 404 it always was (no such campaign or link can exist).
PATH_NAMES = {
    "account_id": "accountID",
    "caller_id": "callerId",
    "message_sid": "messageSid",
    "batch_id": "batchId",
}
CHECKED_HEADERS = {
    "tenant-id": "Tenant-Id",
    "application-key": "Application-Key",
    "environment-name": "Environment-Name",
    "idempotency-key": "Idempotency-Key",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_RAW_CHECKED_HEADERS = frozenset(name.encode() for name in CHECKED_HEADERS)


def may_hold_control_characters(scope: Scope) -> bool:
    """Whether the raw request may hold a control character where `no_control_characters`
    looks: false for all but a few requests, and cheap to ask."""
    return not (
        _CONTROL.search(scope["path"]) is None
        and b"%" not in scope["query_string"]
        and _CONTROL_BYTES.search(scope["query_string"]) is None
        and not any(
            name in _RAW_CHECKED_HEADERS and _CONTROL_BYTES.search(value) is not None
            for name, value in scope["headers"]
        )
    )


def no_control_characters(request: Request[Any, Any, Any]) -> None:
    """NUL and other control characters in a path, query or header value are refused as that
    parameter's 400 (PostgreSQL cannot even store a NUL; no caller means one).

    Run before every handler (a `before_request` hook, not a guard: Litestar copies the route
    handler for each guard call). The raw request is scanned first, which is all a request
    without any costs; only one that may hold such a character is looked at by parameter."""
    if not may_hold_control_characters(request.scope):
        return
    checked: Iterable[tuple[str, str | None]] = [
        *(
            (PATH_NAMES[name], value)
            for name, value in request.path_params.items()
            if name in PATH_NAMES
        ),
        *request.query_params.multi_items(),
        *((shown, request.headers.get(name)) for name, shown in CHECKED_HEADERS.items()),
    ]
    for name, value in checked:
        if isinstance(value, str) and _CONTROL.search(value):
            log.warning("request.control_characters", parameter=name, path=request.url.path)
            raise InvalidParameter(name)
