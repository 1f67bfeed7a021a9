"""What the simulator remembers and how it behaves, shared by its three send APIs (Twilio's,
Vonage's and the generic `/messages` one)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp
import httpx
import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.datastructures import State
from yarl import URL

log = structlog.get_logger("simulator")

Provider = Literal["twilio", "vonage", "simulator"]
PROVIDERS: Final[tuple[Provider, ...]] = ("twilio", "vonage", "simulator")
# Scripted answers for /control's next_errors, each mapped onto every API's own wording:
# `sender_queue_full` and `queue_overflow` are Twilio's 21611 and 30001 (Vonage: throttled),
# `too_many_binds` Vonage's status 10 (the others: throttled), `partial_failure` refuses the
# later parts of a multi-part Vonage send (the others take it), `http_50x` answer that status
# as a load balancer would, and `drop_connection` takes the message, then closes the
# connection without an answer. The rest stand for faults where the sender cannot know what
# happened (see FAULTS): `http_500`; `unavailable`, the provider's own 503 "not processed"
# (what an outage answers); `slow_answer`, `reset_after_accept` and `blackhole`.
ERRORS: Final = frozenset(
    {
        "http_500",
        "unavailable",
        "slow_answer",
        "reset_after_accept",
        "blackhole",
        "throttled",
        "server_error",
        "timeout",
        "invalid_number",
        "opted_out",
        "sender_queue_full",
        "queue_overflow",
        "too_many_binds",
        "partial_failure",
        "http_502",
        "http_503",
        "http_504",
        "drop_connection",
    }
)
# Faults a provider can be put in until cleared (/control `faults`, by provider), or for one
# send (`next_errors`, `next_errors_by_provider`), each standing for what a sender may meet:
# - slow_answer: the message is taken, recorded and delivered, but the answer comes only
#   after `slow_answer_ms`, past the client's timeout: sent, yet in doubt to the sender.
# - reset_after_accept: the message is taken and recorded, then the connection is reset
#   (TCP RST) instead of answered.
# - blackhole: the request is read and nothing is recorded or answered until the client
#   gives up (a provider hung behind its load balancer).
# - outage: refused at once with the API's own 503 "not processed" (nothing recorded).
# Any name of ERRORS may be made persistent the same way (e.g. "http_502").
PERSISTENT_ONLY: Final = frozenset({"outage"})
FAULTS: Final = ERRORS | PERSISTENT_ONLY
# Errors after which the message is taken (recorded, and delivered) all the same.
TAKEN_ANYWAY: Final = frozenset(
    {"partial_failure", "drop_connection", "reset_after_accept", "slow_answer"}
)
TIMEOUT_BODY = "Gateway Timeout"  # what a load balancer says when the provider never answers
GATEWAY_BODIES: Final = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: TIMEOUT_BODY,
}
# The response header a handler sets to have simulator.server close the connection instead
# ("1": an orderly close, "reset": a TCP reset).
DROP_HEADER: Final = "x-simulator-drop-connection"
# The longest a blackholed request is held when its client never hangs up.
BLACKHOLE_MAX_SECONDS: Final = 600.0
# Twilio's message statuses (its MessageInstance.Status), which the generic API speaks too.
TWILIO_STATUS_WORDS: Final = frozenset(
    {
        "queued",
        "sending",
        "sent",
        "failed",
        "delivered",
        "undelivered",
        "receiving",
        "received",
        "accepted",
        "scheduled",
        "read",
        "partially_delivered",
        "canceled",
    }
)
CALLBACK_ORDERS: Final = ("in_order", "reversed")
ERROR_FORMATS: Final = ("classic", "rfc9457")
RECEIPT_FORMATS: Final = ("post_form", "get", "post_json")
SIGNATURE_METHODS: Final = ("md5hash", "md5", "sha1", "sha256", "sha512")
CALLBACK_ATTEMPTS: Final = 4


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
    outage: list[str] = field(default_factory=list)  # providers refusing with their own 503
    # One-shot errors for one provider's API only, taken before `next_errors`.
    next_errors_by_provider: dict[str, list[str]] = field(default_factory=dict)
    # Persistent faults by provider (see FAULTS), until changed or cleared.
    faults: dict[str, str] = field(default_factory=dict)
    # How long a `slow_answer` holds the answer back: past any client timeout we use.
    slow_answer_ms: float = 5_000.0
    # Receipts off for some providers only (`callbacks` turns them off for all): messages
    # still move to their final status, as the handset gets them, but nobody is told.
    callbacks_by_provider: dict[str, bool] = field(default_factory=dict)
    # Realism switches, back to these defaults on DELETE /messages like the scripts above.
    # Twilio and generic callbacks: the statuses reported before the final one, their order
    # (`reversed`: final first), how often each is sent (repeats carry the same
    # I-Twilio-Idempotency-Token), and the final status's ErrorCode (0: 30003 for
    # undelivered, 30008 for failed, none otherwise).
    callback_statuses: list[str] = field(default_factory=lambda: ["sent"])
    callback_order: str = "in_order"
    callback_repeats: int = 1
    final_error_code: int = 0
    error_format: str = "classic"  # Twilio's error body: classic or RFC 9457 problem details
    receipt_format: str = "post_form"  # Vonage receipts: POST form, GET query or POST JSON
    # Callback delivery: concurrent posts per target (scheme://host:port) and how many
    # callbacks may wait for one; beyond that new callbacks are dropped, with a log line.
    callback_concurrency: int = 32
    callback_queue_limit: int = 10_000


# Restored by DELETE /messages: what one test scripts must not leak into the next.
RESETTABLE: Final = (
    "next_errors",
    "outage",
    "next_errors_by_provider",
    "faults",
    "slow_answer_ms",
    "callbacks_by_provider",
    "callback_statuses",
    "callback_order",
    "callback_repeats",
    "final_error_code",
    "error_format",
    "receipt_format",
)


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
    next_errors_by_provider: dict[str, list[str]] | None = None
    faults: dict[str, str | None] | None = None
    slow_answer_ms: float | None = None
    callbacks_by_provider: dict[str, bool | None] | None = None
    callback_statuses: list[str] | None = None
    callback_order: str | None = None
    callback_repeats: int | None = None
    final_error_code: int | None = None
    error_format: str | None = None
    receipt_format: str | None = None
    callback_concurrency: int | None = None
    callback_queue_limit: int | None = None


@dataclass
class Counter:
    requests: int = 0


@dataclass(frozen=True)
class VonageAccount:
    """What the simulator knows of a Vonage account (POST /control/vonage/accounts): requests
    for its api_key are checked against it, and its receipts are signed when it has a secret."""

    api_key: str
    api_secret: str | None = None
    signature_secret: str | None = None
    signature_method: str = "md5hash"  # the dashboard's default
    # Whether its requests must be signed (when it has a signature secret), as Vonage can be
    # told to enforce; otherwise the api_secret is taken too.
    require_signature: bool = True


@dataclass(frozen=True)
class Callback:
    """One webhook request; a retry or a repeat sends these very bytes again."""

    method: str
    url: str
    content: bytes | None
    headers: dict[str, str]


@dataclass
class Delivery:
    """One message's webhooks, each sent `repeats` times, one after the other: a step is
    built (and its status applied) when due, and waits until the one before it is done."""

    steps: deque[tuple[float, Callable[[], Callback]]]
    repeats: int = 1
    current: Callback | None = None
    sends_left: int = 0
    attempt: int = 0


@dataclass
class Target:
    """Everything that goes to one scheme://host:port: one client, a bounded queue and at
    most `concurrency` posting at once."""

    # aiohttp, not httpx: httpx spends several times the CPU per request, and a provider
    # posting two callbacks per message must not be what limits a dispatch it stands in for.
    client: aiohttp.ClientSession
    queue: deque[Delivery] = field(default_factory=deque)
    workers: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class Store:
    """Messages the simulated handsets received, by id, plus each idempotency key's first answer."""

    behaviour: Behaviour
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    # Idempotency keys whose first request is still being decided: a copy arriving meanwhile
    # waits for it, then answers as a replay (or is decided itself if the first took nothing).
    pending_keys: dict[str, asyncio.Event] = field(default_factory=dict)
    # A generic send's signing secret, by message id: kept apart so GET /messages never shows it.
    signing_secrets: dict[str, str] = field(default_factory=dict)
    vonage_accounts: dict[str, VonageAccount] = field(default_factory=dict)
    requests: int = 0
    replays: int = 0
    callbacks_posted: int = 0
    callbacks_dropped: int = 0
    by_provider: dict[str, Counter] = field(
        default_factory=lambda: {name: Counter() for name in PROVIDERS}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    targets: dict[str, Target] = field(default_factory=dict)
    timers: set[asyncio.TimerHandle] = field(default_factory=set)
    closed: bool = False
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

    def callbacks_on(self, provider: Provider) -> bool:
        """Whether `provider`'s messages get receipts (`callbacks` and its own switch)."""
        behaviour = self.behaviour
        return behaviour.callbacks and behaviour.callbacks_by_provider.get(provider, True)

    def deliver_silently(self, message: dict[str, Any], statuses: list[str]) -> None:
        """A message whose receipts are off still reaches its handset: its status moves on
        through `statuses` over the delivery delay, for status lookups, and nobody is told."""
        if self.closed or not statuses:
            return
        loop = asyncio.get_running_loop()
        step = self.behaviour.delivery_delay_ms / 1000 / len(statuses)
        handles: list[asyncio.TimerHandle] = []

        def due(index: int) -> None:
            self.timers.discard(handles[index])
            set_status(message, statuses[index])

        for index in range(len(statuses)):
            handles.append(loop.call_later(step * (index + 1), due, index))
        self.timers.update(handles)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, holding on to it until it ends."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def deliver(self, steps: list[tuple[float, Callable[[], Callback]]], repeats: int = 1) -> None:
        """Send a message's webhooks in the background: each step after its delay (seconds,
        counted from the end of the step before), without a task per message."""
        if steps:
            delivery = Delivery(deque(steps), repeats=max(1, repeats))
            self._later(delivery.steps[0][0], delivery)

    def _later(self, delay: float, delivery: Delivery) -> None:
        if self.closed:
            return
        loop = asyncio.get_running_loop()

        def due() -> None:
            self.timers.discard(handle)
            self._enqueue(delivery)

        handle = loop.call_later(max(delay, 0), due)
        self.timers.add(handle)

    def _enqueue(self, delivery: Delivery) -> None:
        if self.closed:
            return
        if delivery.current is None:
            _, build = delivery.steps.popleft()
            delivery.current, delivery.sends_left, delivery.attempt = build(), delivery.repeats, 0
        callback = delivery.current
        target = self._target(callback.url)
        behaviour = self.behaviour
        if len(target.queue) >= behaviour.callback_queue_limit:
            # Refusing the newest keeps those already waiting in order; a provider that
            # cannot keep up with its callbacks loses some too, and status lookups remain.
            self.callbacks_dropped += 1
            log.warning("simulator.callback_dropped", url=callback.url, queued=len(target.queue))
            self._next_step(delivery)
            return
        target.queue.append(delivery)
        if len(target.workers) < max(1, behaviour.callback_concurrency):
            worker = asyncio.get_running_loop().create_task(self._work(target))
            target.workers.add(worker)
            worker.add_done_callback(target.workers.discard)

    def _target(self, url: str) -> Target:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        target = self.targets.get(key)
        if target is None:
            limit = max(1, self.behaviour.callback_concurrency)
            client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10),
                connector=aiohttp.TCPConnector(limit=limit),
            )
            target = self.targets[key] = Target(client)
        return target

    async def _work(self, target: Target) -> None:
        while target.queue:
            delivery = target.queue.popleft()
            callback = delivery.current
            assert callback is not None
            try:
                async with target.client.request(
                    callback.method,
                    # As built: the bytes of the URL are what the signature covers.
                    URL(callback.url, encoded=True),
                    data=callback.content,
                    headers=callback.headers,
                ) as response:
                    await response.read()
                error = None if response.status < 500 else f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            self.callbacks_posted += 1
            if error is None:
                delivery.sends_left -= 1
                delivery.attempt = 0
                if delivery.sends_left > 0:
                    self._later(0, delivery)  # a repeat: the same bytes, the same token
                else:
                    self._next_step(delivery)
                continue
            # As real providers do: a few tries with backoff on connection errors and 5xx.
            delivery.attempt += 1
            log.warning(
                "simulator.callback_failed", url=callback.url, error=error, attempt=delivery.attempt
            )
            if delivery.attempt < CALLBACK_ATTEMPTS:
                self._later(0.5 * 2 ** (delivery.attempt - 1), delivery)
            else:
                self._next_step(delivery)

    def _next_step(self, delivery: Delivery) -> None:
        delivery.current = None
        if delivery.steps:
            self._later(delivery.steps[0][0], delivery)

    def stats(self) -> dict[str, Any]:
        sent = {name: 0 for name in PROVIDERS}
        for message in self.messages.values():
            sent[message["provider"]] += 1
        return {
            "requests": self.requests,
            "messages": len(self.messages),
            "replays": self.replays,
            "callbacks": {"posted": self.callbacks_posted, "dropped": self.callbacks_dropped},
            "by_provider": {
                name: {"requests": self.by_provider[name].requests, "messages": sent[name]}
                for name in PROVIDERS
            },
        }

    def reset(self) -> None:
        """Forget messages, counters, registered Vonage accounts, scripts (next_errors, outage)
        and realism switches (see RESETTABLE); keep the rest. Callbacks under way go on."""
        self.messages.clear()
        self.by_key.clear()
        self.signing_secrets.clear()
        self.vonage_accounts.clear()
        self.requests = self.replays = self.callbacks_posted = self.callbacks_dropped = 0
        for counter in self.by_provider.values():
            counter.requests = 0
        defaults = Behaviour(latency_ms=0, failure_rate=0)
        for name in RESETTABLE:
            setattr(self.behaviour, name, getattr(defaults, name))

    async def aclose(self) -> None:
        """Drop callbacks still pending and close the HTTP clients."""
        self.closed = True
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
        workers = [task for target in self.targets.values() for task in target.workers]
        for task in [*self.tasks, *workers]:
            task.cancel()
        await asyncio.gather(*self.tasks, *workers, return_exceptions=True)
        for target in self.targets.values():
            await target.client.close()
        self.targets.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def store_of(request: Request[Any, Any, State]) -> Store:
    store: Store = request.app.state.store
    return store


async def decide(store: Store, provider: Provider) -> str | None:
    """The error this send is answered with, or None to accept it, after the latency.

    In order: the next scripted error for `provider`, the next for any API, `provider`'s
    persistent fault, an outage of `provider`, then the random failure rates. A "timeout"
    has already kept the caller waiting when it returns."""
    behaviour = store.behaviour
    # Taken on arrival, so concurrent sends consume the script in the order they came.
    own = behaviour.next_errors_by_provider.get(provider)
    error = own.pop(0) if own else None
    if error is None and behaviour.next_errors:
        error = behaviour.next_errors.pop(0)
    if error is None:
        error = behaviour.faults.get(provider)
    if error == "outage" or (error is None and provider in behaviour.outage):
        error = "unavailable"
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


async def hold(request: Request[Any, Any, State]) -> None:
    """A blackhole: keep the request unanswered until its client hangs up (or, for a client
    that never does, BLACKHOLE_MAX_SECONDS)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(BLACKHOLE_MAX_SECONDS):
            while True:
                # The body has been read, so the next message is the client going away.
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return


def gateway_answer(error: str | None) -> Response[Any] | None:
    """What a load balancer in front of any of the APIs answers for `error`, if it is one
    of its own (a timeout, an HTTP status); None for the API's own answers."""
    if error == "timeout":
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    if error is not None and error.startswith("http_"):
        status = int(error.removeprefix("http_"))
        return Response(GATEWAY_BODIES[status], status_code=status, media_type=MediaType.TEXT)
    return None


async def answer_taken(store: Store, error: str | None, response: Response[Any]) -> Response[Any]:
    """The answer to a send that was taken, as the scripted fault shapes it: held back past
    the client's timeout (slow_answer), or replaced by a closed or reset connection."""
    if error == "slow_answer":
        await asyncio.sleep(store.behaviour.slow_answer_ms / 1000)
    elif error == "drop_connection":
        response.headers[DROP_HEADER] = "1"
    elif error == "reset_after_accept":
        response.headers[DROP_HEADER] = "reset"
    return response


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


# Statuses that mean the message has left for the handset: the first sets its sentAt (what
# Twilio calls date_sent, null until then).
SENT_STATUSES: Final = frozenset(
    {"sent", "delivered", "undelivered", "partially_delivered", "read"}
)


def set_status(message: dict[str, Any], status: str) -> None:
    message["status"] = status
    message["updatedAt"] = utc_now().isoformat()
    if status in SENT_STATUSES and not message.get("sentAt"):
        message["sentAt"] = message["updatedAt"]


def twilio_final_status(status: str) -> str:
    """The configured final status in Twilio's words (also the generic API's)."""
    return {"expired": "undelivered", "rejected": "failed"}.get(status, status)


def vonage_final_status(status: str) -> str:
    """The configured final status in Vonage's DLR words."""
    return {"undelivered": "expired"}.get(status, status)


def callback_statuses(behaviour: Behaviour) -> tuple[list[str], list[str]]:
    """(what each callback reports, what the message's status has become by then): the
    scripted intermediate statuses and the final one, in the scripted order."""
    happened = [*behaviour.callback_statuses, twilio_final_status(behaviour.final_status)]
    reported = list(reversed(happened)) if behaviour.callback_order == "reversed" else happened
    return reported, happened


def delivery_steps(
    behaviour: Behaviour, build: Callable[[str, str], Callback]
) -> list[tuple[float, Callable[[], Callback]]]:
    """The steps of Twilio-style callbacks, spread over the delivery delay; `build(reported,
    happened)` makes each one when it is due."""
    reported, happened = callback_statuses(behaviour)
    delay = behaviour.delivery_delay_ms / 1000 / len(reported)

    def step(report: str, status: str) -> Callable[[], Callback]:
        return lambda: build(report, status)

    return [(delay, step(r, h)) for r, h in zip(reported, happened, strict=True)]


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


def basic_auth(request: Request[Any, Any, State]) -> tuple[str, str] | None:
    """(user, password) of a request's HTTP Basic authorization, if it carries a usable one."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user and password else None
