"""The provider simulator: takes messages over HTTP like a real provider, with configurable
latency and failures, and reports delivery to each message's signed status callback.

It keeps state in memory: it stands for a provider, not for anything we must not lose."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import structlog
from litestar import Litestar, MediaType, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromQuery

from shared.logging import configure_logging
from shared.providers.simulator import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign
from shared.settings import Settings, get_settings

log = structlog.get_logger(__name__)


@dataclass
class Behaviour:
    """What the simulator does with the next requests; tests change it through /control."""

    latency_ms: float
    failure_rate: float  # share of sends answered 503 (transient)
    permanent_failure_rate: float = 0.0  # share answered 400 code 21211 (final)
    delivery_delay_ms: float = 200.0
    final_status: str = "delivered"
    callbacks: bool = True


class Control(msgspec.Struct, omit_defaults=True):
    latency_ms: float | None = None
    failure_rate: float | None = None
    permanent_failure_rate: float | None = None
    delivery_delay_ms: float | None = None
    final_status: str | None = None
    callbacks: bool | None = None


class SendBody(msgspec.Struct, rename={"sender": "from"}):
    to: str
    sender: str
    body: str
    statusCallback: str | None = None  # noqa: N815 - the wire's spelling
    validityPeriod: int | None = None  # noqa: N815


@dataclass
class Store:
    """Messages the simulated handsets received, by id, plus each idempotency key's first answer."""

    behaviour: Behaviour
    secret: str
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    replays: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    client: httpx.AsyncClient | None = None


@post("/messages", status_code=201)
async def send(request: Request[object, object, State], data: SendBody) -> Response[Any]:
    store: Store = request.app.state.store
    store.requests += 1
    behaviour = store.behaviour
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key and key in store.by_key:
        # The same send again (a retry after a lost answer): the handset gets nothing new.
        store.replays += 1
        return Response(store.messages[store.by_key[key]], status_code=200)
    await asyncio.sleep(behaviour.latency_ms / 1000)
    roll = random.random()
    if roll < behaviour.failure_rate:
        return Response({"code": "20503", "message": "simulated provider outage"}, status_code=503)
    if roll < behaviour.failure_rate + behaviour.permanent_failure_rate:
        return Response(
            {"code": "21211", "message": "The 'To' number is not a valid phone number"},
            status_code=400,
        )
    message: dict[str, Any] = {
        "id": "SIM" + uuid.uuid4().hex,
        "to": data.to,
        "from": data.sender,
        "body": data.body,
        "status": "queued",
        "idempotencyKey": key,
    }
    store.messages[message["id"]] = message
    if key:
        store.by_key[key] = message["id"]
    if data.statusCallback and behaviour.callbacks:
        task = asyncio.create_task(_report(store, message, data.statusCallback))
        store.tasks.add(task)
        task.add_done_callback(store.tasks.discard)
    return Response(message, status_code=201)


async def _report(store: Store, message: dict[str, Any], url: str) -> None:
    """Call the status callback as a provider would: `sent`, then the final status."""
    await asyncio.sleep(store.behaviour.delivery_delay_ms / 2000)
    for status in ("sent", store.behaviour.final_status):
        message["status"] = status
        body = msgspec.json.encode({"id": message["id"], "status": status, "to": message["to"]})
        await _post_callback(store, url, body)
        await asyncio.sleep(store.behaviour.delivery_delay_ms / 2000)


async def _post_callback(store: Store, url: str, body: bytes, attempts: int = 4) -> None:
    """POST one callback, retrying a few times with backoff as real providers do."""
    assert store.client is not None
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(store.secret, url, body)}
    for attempt in range(attempts):
        try:
            response = await store.client.post(url, content=body, headers=headers)
            if response.status_code < 500:
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = str(exc) or type(exc).__name__
        log.warning("simulator.callback_failed", url=url, error=error, attempt=attempt + 1)
        await asyncio.sleep(0.5 * 2**attempt)


@get("/messages")
async def list_messages(
    request: Request[object, object, State], idempotency_key: FromQuery[str | None] = None
) -> list[dict[str, Any]]:
    store: Store = request.app.state.store
    messages = list(store.messages.values())
    if idempotency_key is not None:
        messages = [m for m in messages if m["idempotencyKey"] == idempotency_key]
    return messages


@get("/stats")
async def stats(request: Request[object, object, State]) -> dict[str, int]:
    store: Store = request.app.state.store
    return {"requests": store.requests, "messages": len(store.messages), "replays": store.replays}


@post("/control", status_code=200)
async def control(request: Request[object, object, State], data: Control) -> dict[str, Any]:
    store: Store = request.app.state.store
    for name, value in msgspec.structs.asdict(data).items():
        if value is not None:
            setattr(store.behaviour, name, value)
    return msgspec.structs.asdict(Control(**vars(store.behaviour)))


@delete("/messages", status_code=204)
async def reset(request: Request[object, object, State]) -> None:
    store: Store = request.app.state.store
    store.messages.clear()
    store.by_key.clear()
    store.requests = store.replays = 0


@get("/health", media_type=MediaType.TEXT)
async def health() -> str:
    return "ok"


def create_app(settings: Settings | None = None) -> Litestar:
    """The simulator as an ASGI app (`uvicorn simulator.app:create_app --factory`)."""
    settings = settings or get_settings()
    configure_logging(settings)
    store = Store(
        behaviour=Behaviour(
            latency_ms=settings.simulator_latency.total_seconds() * 1000,
            failure_rate=settings.simulator_failure_rate,
            delivery_delay_ms=settings.simulator_delivery_delay.total_seconds() * 1000,
        ),
        secret=settings.simulator_signing_secret.get_secret_value(),
    )

    async def open_client() -> None:
        store.client = httpx.AsyncClient(timeout=10)

    async def close_client() -> None:
        if store.client is not None:
            await store.client.aclose()

    return Litestar(
        route_handlers=[send, list_messages, stats, control, reset, health],
        state=State({"store": store}),
        on_startup=[open_client],
        on_shutdown=[close_client],
        openapi_config=None,
        logging_config=None,
    )
