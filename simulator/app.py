"""The provider simulator: takes messages over HTTP like a real provider, with configurable
latency and failures, and reports delivery to each message's signed status callback.

It speaks three APIs on the same port: its own generic `/messages` JSON API (the "simulator"
provider), Twilio's Messages API and Vonage's SMS API, close enough for the official SDKs.
`/control` steers all three; `/messages` and `/stats` show what the handsets got.

Generic sends authenticate with HTTP Basic account_id:signing_secret; the secret signs that
message's callbacks (X-Simulator-Signature over timestamp, URL and body). Sends without it
are taken too, for hand tests, but their callbacks go out unsigned.

It keeps state in memory: it stands for a provider, not for anything we must not lose."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import msgspec
from litestar import Litestar, MediaType, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.params import FromPath, FromQuery, JSONBody

from shared.core.logging import configure_logging
from shared.core.settings import Settings, get_settings
from shared.providers.simulator import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from simulator import twilio_api, vonage_api
from simulator.state import (
    CALLBACK_ORDERS,
    ERROR_FORMATS,
    ERRORS,
    FAULTS,
    PROVIDERS,
    RECEIPT_FORMATS,
    SIGNATURE_METHODS,
    TAKEN_ANYWAY,
    TIMEOUT_BODY,
    TWILIO_STATUS_WORDS,
    Behaviour,
    Callback,
    Control,
    Store,
    VonageAccount,
    answer_taken,
    basic_auth,
    callback_statuses,
    decide,
    delivery_steps,
    gateway_answer,
    hold,
    new_message,
    set_status,
    store_of,
)

# The generic API's answers to scripted errors: (HTTP status, code, message).
GENERIC_ERRORS: dict[str, tuple[int, str, str]] = {
    "throttled": (429, "20429", "Too Many Requests"),
    "server_error": (503, "20503", "simulated provider outage"),
    "invalid_number": (400, "21211", "The 'To' number is not a valid phone number"),
    "opted_out": (400, "21610", "Attempt to send to unsubscribed recipient"),
    "sender_queue_full": (400, "21611", "This 'From' number has exceeded the queue limit"),
    "queue_overflow": (429, "30001", "Queue overflow"),
    "too_many_binds": (429, "20429", "Too Many Requests"),
    # The provider's own "not processed, try later" (what an outage answers).
    "unavailable": (503, "20503", "Service Unavailable"),
}
# What POST /messages has always answered with; GET /messages shows more.
GENERIC_FIELDS = ("id", "to", "from", "body", "status", "idempotencyKey")


class SendBody(msgspec.Struct, rename={"sender": "from"}):
    to: str
    sender: str
    body: str
    statusCallback: str | None = None  # noqa: N815 - the wire's spelling
    validityPeriod: int | None = None  # noqa: N815


class InboundBody(msgspec.Struct, rename={"sender": "from"}):
    """POST /control/inbound: make `provider` deliver an SMS from a customer to our webhook."""

    provider: str
    url: str
    sender: str
    to: str
    text: str = "STOP"
    account: str | None = None  # Twilio AccountSid or Vonage api_key
    auth_token: str | None = None  # Twilio: the auth token that signs the webhook


class VonageAccountBody(msgspec.Struct):
    """POST /control/vonage/accounts: what the simulator checks and signs for an api_key."""

    api_key: str
    api_secret: str | None = None
    signature_secret: str | None = None
    signature_method: str = "md5hash"
    require_signature: bool = True


def _generic_view(message: dict[str, Any]) -> dict[str, Any]:
    return {name: message[name] for name in GENERIC_FIELDS}


@post("/messages", status_code=201)
async def send(request: Request[object, object, State], data: JSONBody[SendBody]) -> Response[Any]:
    store = store_of(request)
    store.count_request("simulator")
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if not key:
        return await _send(request, store, data, None)
    # A copy that arrives while the first is still being decided waits for it, so the
    # handset never gets two: it then replays the first's message, or is decided itself.
    while (first := store.pending_keys.get(key)) is not None:
        await first.wait()
    if key in store.by_key:
        # The same send again (a retry after a lost answer): the handset gets nothing new.
        store.replays += 1
        return Response(_generic_view(store.messages[store.by_key[key]]), status_code=200)
    store.pending_keys[key] = asyncio.Event()
    try:
        return await _send(request, store, data, key)
    finally:
        _release(store, key)


def _release(store: Store, key: str | None) -> None:
    if key is not None and (event := store.pending_keys.pop(key, None)) is not None:
        event.set()


async def _send(
    request: Request[object, object, State], store: Store, data: SendBody, key: str | None
) -> Response[Any]:
    error = await decide(store, "simulator")
    if (gateway := gateway_answer(error)) is not None:
        return gateway
    if error == "blackhole":
        _release(store, key)  # nothing was taken: a copy is decided on its own
        await hold(request)
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    if error is not None and error not in TAKEN_ANYWAY:
        status, code, text = GENERIC_ERRORS[error]
        return Response({"code": code, "message": text}, status_code=status)
    account = basic_auth(request)
    message = new_message(
        "simulator",
        "SIM" + uuid.uuid4().hex,
        to=data.to,
        sender=data.sender,
        body=data.body,
        account=account[0] if account else None,
        idempotencyKey=key,
        statusCallback=data.statusCallback,
        validityPeriod=data.validityPeriod,
    )
    store.record(message)
    if account:
        store.signing_secrets[message["id"]] = account[1]
    if key:
        store.by_key[key] = message["id"]
        _release(store, key)  # taken: copies from now on are replays, even during a slow answer
    if data.statusCallback and store.callbacks_on("simulator"):
        _report(store, message, data.statusCallback)
    else:
        store.deliver_silently(message, callback_statuses(store.behaviour)[1])
    return await answer_taken(store, error, Response(_generic_view(message), status_code=201))


def _report(store: Store, message: dict[str, Any], url: str) -> None:
    """Call the status callback as a provider would (by default `sent`, then the final
    status), signed with the secret the send authenticated with, if any."""
    secret = store.signing_secrets.get(message["id"])

    def build(reported: str, happened: str) -> Callback:
        set_status(message, happened)
        body = msgspec.json.encode(
            {
                "id": message["id"],
                "status": reported,
                "to": message["to"],
                "accountId": message["account"],
            }
        )
        headers = {"Content-Type": "application/json"}
        if secret:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, url, body)
        return Callback("POST", url, body, headers)

    store.deliver(delivery_steps(store.behaviour, build), store.behaviour.callback_repeats)


@get("/messages")
async def list_messages(
    request: Request[object, object, State],
    provider: FromQuery[str | None] = None,
    idempotency_key: FromQuery[str | None] = None,
) -> list[dict[str, Any]]:
    """Every message the simulated handsets got, through any API, oldest first."""
    messages = list(store_of(request).messages.values())
    if provider is not None:
        messages = [m for m in messages if m["provider"] == provider]
    if idempotency_key is not None:
        messages = [m for m in messages if m["idempotencyKey"] == idempotency_key]
    return messages


@get("/messages/{message_id:str}")
async def get_message(
    request: Request[object, object, State], message_id: FromPath[str]
) -> Response[Any]:
    """One message, whichever API took it, with its status now (what a status lookup asks)."""
    message = store_of(request).messages.get(message_id)
    if message is None:
        return Response({"code": "20404", "message": "no such message"}, status_code=404)
    return Response(message, status_code=200)


@get("/stats")
async def stats(request: Request[object, object, State]) -> dict[str, Any]:
    return store_of(request).stats()


def _behaviour_view(store: Store) -> dict[str, Any]:
    behaviour = store.behaviour
    return msgspec.structs.asdict(
        Control(
            **{
                **vars(behaviour),
                "next_errors": list(behaviour.next_errors),
                "outage": list(behaviour.outage),
                "next_errors_by_provider": {
                    name: list(errors) for name, errors in behaviour.next_errors_by_provider.items()
                },
                "faults": dict(behaviour.faults),
                "callbacks_by_provider": dict(behaviour.callbacks_by_provider),
            }
        )
    )


@get("/control")
async def get_control(request: Request[object, object, State]) -> dict[str, Any]:
    return _behaviour_view(store_of(request))


@post("/control", status_code=200)
async def control(
    request: Request[object, object, State], data: JSONBody[Control]
) -> dict[str, Any]:
    """Change what the simulator does next; fields left out keep their value. `next_errors`
    and `outage` replace the current lists. `faults`, `next_errors_by_provider` and
    `callbacks_by_provider` change the providers they name (null forgets one's entry);
    an empty object clears them all."""
    store = store_of(request)
    by_provider = [
        *(data.next_errors_by_provider or {}),
        *(data.faults or {}),
        *(data.callbacks_by_provider or {}),
    ]
    unknown = sorted(set(by_provider) - set(PROVIDERS))
    if unknown:
        raise ValidationException(f"unknown providers {unknown}; choose from {PROVIDERS}")
    scripted = [*(data.next_errors or ())]
    for errors in (data.next_errors_by_provider or {}).values():
        scripted += errors or ()
    unknown = sorted(set(scripted) - ERRORS)
    if unknown:
        raise ValidationException(f"unknown next_errors {unknown}; choose from {sorted(ERRORS)}")
    unknown = sorted({fault for fault in (data.faults or {}).values() if fault} - FAULTS)
    if unknown:
        raise ValidationException(f"unknown faults {unknown}; choose from {sorted(FAULTS)}")
    if data.slow_answer_ms is not None and data.slow_answer_ms < 0:
        raise ValidationException("slow_answer_ms must not be negative")
    unknown = sorted(set(data.outage or ()) - set(PROVIDERS))
    if unknown:
        raise ValidationException(f"unknown outage providers {unknown}; choose from {PROVIDERS}")
    unknown = sorted(set(data.callback_statuses or ()) - TWILIO_STATUS_WORDS)
    if unknown:
        raise ValidationException(f"unknown callback_statuses {unknown}")
    for name, value, allowed in (
        ("callback_order", data.callback_order, CALLBACK_ORDERS),
        ("error_format", data.error_format, ERROR_FORMATS),
        ("receipt_format", data.receipt_format, RECEIPT_FORMATS),
    ):
        if value is not None and value not in allowed:
            raise ValidationException(f"{name} must be one of {list(allowed)}")
    for name, number in (
        ("callback_repeats", data.callback_repeats),
        ("callback_concurrency", data.callback_concurrency),
        ("callback_queue_limit", data.callback_queue_limit),
    ):
        if number is not None and number < 1:
            raise ValidationException(f"{name} must be at least 1")
    for name, value in msgspec.structs.asdict(data).items():
        if value is None:
            continue
        if isinstance(value, dict):
            current: dict[str, Any] = getattr(store.behaviour, name)
            if not value:
                current.clear()
            for provider, setting in value.items():
                if setting is None:
                    current.pop(provider, None)
                else:
                    current[provider] = list(setting) if isinstance(setting, list) else setting
            continue
        setattr(store.behaviour, name, list(value) if isinstance(value, list) else value)
    return _behaviour_view(store)


@post("/control/inbound", status_code=200)
async def inbound(
    request: Request[object, object, State], data: JSONBody[InboundBody]
) -> Response[Any]:
    """Post `provider`'s inbound-SMS webhook to `url`, signed as that provider signs it, and
    answer with the status the webhook answered (502 when it could not be reached)."""
    store = store_of(request)
    if not data.account:
        raise ValidationException("account (the AccountSid or api_key) is required")
    if data.provider == "twilio":
        if not data.auth_token:
            raise ValidationException("auth_token is required to sign Twilio webhooks")
        params = twilio_api.inbound_params(data.account, data.sender, data.to, data.text)
        body, headers = twilio_api.signed_form(data.url, params, data.auth_token)
    elif data.provider == "vonage":
        params = vonage_api.inbound_params(data.account, data.sender, data.to, data.text)
        body, headers = vonage_api.signed_form(params, store.vonage_accounts.get(data.account))
    else:
        raise ValidationException("provider must be twilio or vonage")
    try:
        response = await store.client.post(data.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return Response({"error": str(exc) or type(exc).__name__, "sent": params}, status_code=502)
    if response.status_code in (204, 304) or response.status_code < 200:
        return Response(None, status_code=response.status_code)
    return Response(
        {"status": response.status_code, "sent": params, "response": response.text[:2000]},
        status_code=response.status_code,
    )


@post("/control/vonage/accounts", status_code=200)
async def register_vonage_account(
    request: Request[object, object, State], data: JSONBody[VonageAccountBody]
) -> dict[str, Any]:
    """Tell the simulator a Vonage account's secrets (replacing what it knew of the api_key):
    its sends must then carry the api_secret or a valid `sig`, and its receipts and inbound
    webhooks are signed with `signature_method`. Accounts it does not know are taken on
    trust and get unsigned receipts, as a Vonage account without a signature secret does."""
    if data.signature_method not in SIGNATURE_METHODS:
        raise ValidationException(f"signature_method must be one of {list(SIGNATURE_METHODS)}")
    if not data.api_secret and not data.signature_secret:
        raise ValidationException("api_secret or signature_secret is required")
    account = VonageAccount(
        data.api_key,
        data.api_secret,
        data.signature_secret,
        data.signature_method,
        data.require_signature,
    )
    store_of(request).vonage_accounts[data.api_key] = account
    return {
        "api_key": account.api_key,
        "signature_method": account.signature_method,
        "signed": account.signature_secret is not None,
        "require_signature": account.require_signature,
    }


@delete("/messages", status_code=204)
async def reset(request: Request[object, object, State]) -> None:
    """Forget messages, counters, registered Vonage accounts, scripted errors (next_errors and
    outage) and the realism switches (callback_statuses ... receipt_format)."""
    store_of(request).reset()


@get("/health", media_type=MediaType.TEXT)
async def health() -> str:
    return "ok"


def create_store(settings: Settings) -> Store:
    return Store(
        behaviour=Behaviour(
            latency_ms=settings.simulator_latency.total_seconds() * 1000,
            failure_rate=settings.simulator_failure_rate,
            delivery_delay_ms=settings.simulator_delivery_delay.total_seconds() * 1000,
        ),
    )


def create_app(settings: Settings | None = None) -> Litestar:
    """The simulator as an ASGI app (`uvicorn simulator.app:create_app --factory`; the
    `sms-dispatch simulator` command serves it on HTTP and HTTPS, see simulator.server)."""
    settings = settings or get_settings()
    configure_logging(settings)
    store = create_store(settings)
    return Litestar(
        route_handlers=[
            send,
            list_messages,
            get_message,
            stats,
            get_control,
            control,
            inbound,
            register_vonage_account,
            reset,
            health,
            *twilio_api.ROUTES,
            *vonage_api.ROUTES,
        ],
        state=State({"store": store}),
        on_shutdown=[store.aclose],
        openapi_config=None,
        logging_config=None,
    )
