"""What the simulator remembers and how it behaves, shared by its three send APIs (Twilio's,
Vonage's and the generic `/messages` one)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx
import msgspec
import structlog
from litestar import Request
from litestar.datastructures import State

log = structlog.get_logger("simulator")

Provider = Literal["twilio", "vonage", "simulator"]
PROVIDERS: Final[tuple[Provider, ...]] = ("twilio", "vonage", "simulator")
# Scripted answers for /control's next_errors, each mapped onto every API's own wording.
ERRORS: Final = frozenset({"throttled", "server_error", "timeout", "invalid_number", "opted_out"})
TIMEOUT_BODY = "Gateway Timeout"  # what a load balancer says when the provider never answers


@dataclass
class Behaviour:
    """What the simulator does with the next requests; tests change it through /control."""

    latency_ms: float
    failure_rate: float  # share of sends answered as server errors (transient)
    permanent_failure_rate: float = 0.0  # share answered as an invalid number (final)
    delivery_delay_ms: float = 200.0
    # Twilio's words (delivered, undelivered, failed) or Vonage's (expired, rejected);
    # each API reports it in its own words.
    final_status: str = "delivered"
    callbacks: bool = True
    timeout_ms: float = 20_000.0  # how long a scripted "timeout" keeps the sender waiting
    next_errors: list[str] = field(default_factory=list)  # consumed one per send request
    outage: list[str] = field(default_factory=list)  # providers answering server errors


class Control(msgspec.Struct, omit_defaults=True):
    latency_ms: float | None = None
    failure_rate: float | None = None
    permanent_failure_rate: float | None = None
    delivery_delay_ms: float | None = None
    final_status: str | None = None
    callbacks: bool | None = None
    timeout_ms: float | None = None
    next_errors: list[str] | None = None
    outage: list[str] | None = None


@dataclass
class Counter:
    requests: int = 0


@dataclass
class Store:
    """Messages the simulated handsets received, by id, plus each idempotency key's first answer."""

    behaviour: Behaviour
    secret: str
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    replays: int = 0
    by_provider: dict[str, Counter] = field(
        default_factory=lambda: {name: Counter() for name in PROVIDERS}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """Made on first use, in the loop that serves requests (the app may serve several)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10)
        return self._client

    def count_request(self, provider: Provider) -> None:
        self.requests += 1
        self.by_provider[provider].requests += 1

    def record(self, message: dict[str, Any]) -> None:
        self.messages[message["id"]] = message

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (a callback) in the background, holding on to it until it ends."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, Any]:
        sent = {name: 0 for name in PROVIDERS}
        for message in self.messages.values():
            sent[message["provider"]] += 1
        return {
            "requests": self.requests,
            "messages": len(self.messages),
            "replays": self.replays,
            "by_provider": {
                name: {"requests": self.by_provider[name].requests, "messages": sent[name]}
                for name in PROVIDERS
            },
        }

    def reset(self) -> None:
        """Forget messages, counters and scripts (next_errors, outage); keep the rest."""
        self.messages.clear()
        self.by_key.clear()
        self.requests = self.replays = 0
        for counter in self.by_provider.values():
            counter.requests = 0
        self.behaviour.next_errors.clear()
        self.behaviour.outage.clear()

    async def aclose(self) -> None:
        """Drop callbacks still pending and close the HTTP client."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def store_of(request: Request[Any, Any, State]) -> Store:
    store: Store = request.app.state.store
    return store


async def decide(store: Store, provider: Provider) -> str | None:
    """The error this send is answered with, or None to accept it, after the latency.

    In order: the next scripted error (any API takes it), an outage of `provider`, then the
    random failure rates. A "timeout" has already kept the caller waiting when it returns."""
    behaviour = store.behaviour
    # Taken on arrival, so concurrent sends consume the script in the order they came.
    error = behaviour.next_errors.pop(0) if behaviour.next_errors else None
    if error is None and provider in behaviour.outage:
        error = "server_error"
    await asyncio.sleep(behaviour.latency_ms / 1000)
    if error is None:
        roll = random.random()
        if roll < behaviour.failure_rate:
            error = "server_error"
        elif roll < behaviour.failure_rate + behaviour.permanent_failure_rate:
            error = "invalid_number"
    if error == "timeout":
        await asyncio.sleep(behaviour.timeout_ms / 1000)
    if error is not None:
        log.info("simulator.scripted_error", provider=provider, error=error)
    return error


def new_message(
    provider: Provider,
    message_id: str,
    *,
    to: str,
    sender: str,
    body: str,
    account: str | None = None,
    status: str = "queued",
    **extra: Any,
) -> dict[str, Any]:
    """A handset's message as GET /messages lists it, whichever API it came through."""
    now = utc_now().isoformat()
    return {
        "id": message_id,
        "provider": provider,
        "to": to,
        "from": sender,
        "body": body,
        "status": status,
        "account": account,
        "idempotencyKey": None,
        "clientRef": None,
        "segments": count_segments(body),
        "createdAt": now,
        "updatedAt": now,
        **extra,
    }


def set_status(message: dict[str, Any], status: str) -> None:
    message["status"] = status
    message["updatedAt"] = utc_now().isoformat()


def twilio_final_status(status: str) -> str:
    """The configured final status in Twilio's words (also the generic API's)."""
    return {"expired": "undelivered", "rejected": "failed"}.get(status, status)


def vonage_final_status(status: str) -> str:
    """The configured final status in Vonage's DLR words."""
    return {"undelivered": "expired"}.get(status, status)


async def post_callback(
    store: Store, url: str, body: bytes, headers: Mapping[str, str], attempts: int = 4
) -> None:
    """POST one callback, retrying a few times with backoff on connection errors and 5xx,
    as real providers do."""
    for attempt in range(attempts):
        try:
            response = await store.client.post(url, content=body, headers=dict(headers))
            if response.status_code < 500:
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = str(exc) or type(exc).__name__
        log.warning("simulator.callback_failed", url=url, error=error, attempt=attempt + 1)
        if attempt + 1 < attempts:
            await asyncio.sleep(0.5 * 2**attempt)


def utc_now() -> datetime:
    return datetime.now(UTC)


# GSM 03.38: the basic table costs one septet a character, the extension table two.
GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED: Final = frozenset("\f^{}\\[~]|€")


def count_segments(text: str) -> int:
    """SMS segments `text` takes: 160/153 septets in GSM-7, else 70/67 UTF-16 units."""
    if all(char in GSM7_BASIC or char in GSM7_EXTENDED for char in text):
        units = len(text) + sum(char in GSM7_EXTENDED for char in text)
        single, part = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = 70, 67
    return 1 if units <= single else math.ceil(units / part)
