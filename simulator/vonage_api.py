"""Enough of Vonage's SMS API for the official `vonage` SDK: `POST /sms/json`, delivery
receipts and inbound-SMS webhooks signed with `sig` (HMAC-SHA256, as Vonage signs)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlencode

from litestar import MediaType, Request, Response, post
from litestar.datastructures import State
from vonage_http_client.auth import Auth  # type: ignore[import-untyped, unused-ignore]

from simulator.state import (
    TIMEOUT_BODY,
    Store,
    decide,
    new_message,
    post_callback,
    set_status,
    store_of,
    utc_now,
    vonage_final_status,
)

NETWORK: Final = "12345"
PRICE: Final = "0.03330000"
NUMBER = re.compile(r"\+?[1-9]\d{5,14}")

# Status "1" and "5" are worth retrying; "3" and "4" are final.
SCRIPTED: Final[dict[str, tuple[str, str]]] = {
    "throttled": ("1", "Throughput Rate Exceeded - please wait [ 1000 ] and retry"),
    "server_error": ("5", "Internal Error"),
    "invalid_number": ("3", "Invalid to address"),
    "opted_out": ("3", "Invalid to address: the recipient has opted out"),
}
# DLR err-code for each final status other than delivered.
DLR_ERROR_CODES: Final = {"expired": "2", "failed": "8", "rejected": "6"}


def vonage_answer(messages: list[dict[str, str]]) -> Response[Any]:
    """Vonage answers 200 even for refusals: each message carries its own status."""
    return Response(
        {"message-count": str(len(messages)), "messages": messages},
        status_code=200,
    )


def vonage_error(status: str, text: str) -> Response[Any]:
    return vonage_answer([{"status": status, "error-text": text}])


def _basic_auth(request: Request[Any, Any, State]) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user and password else None


def _credentials(
    request: Request[Any, Any, State], params: Mapping[str, str]
) -> str | Response[Any]:
    """The api_key the request authenticated as, or the refusal to answer.

    Accepts api_key + api_secret (form or query), HTTP Basic api_key:api_secret (what the
    v4 SDK sends), or api_key + sig + timestamp (signed requests; the sig is not checked)."""
    basic = _basic_auth(request)
    if basic is not None:
        return basic[0]
    api_key = params.get("api_key")
    if not api_key:
        return vonage_error("2", "Missing api_key")
    if params.get("api_secret") or (params.get("sig") and params.get("timestamp")):
        return api_key
    return vonage_error("4", "Bad Credentials")


def _e164(number: str) -> str:
    """How GET /messages shows a number: E.164 with its +; sender names stay as they are."""
    digits = number.removeprefix("+")
    return f"+{digits}" if digits.isdigit() else number


@post("/sms/json", status_code=200)
async def vonage_send(request: Request[Any, Any, State]) -> Response[Any]:
    """Send an SMS: api_key/api_secret (or Basic, or sig), from, to, text, client-ref,
    callback, type."""
    store = store_of(request)
    store.count_request("vonage")
    form = await request.form()
    params = {name: value for name, value in request.query_params.items() if isinstance(value, str)}
    params.update({name: value for name, value in form.items() if isinstance(value, str)})
    api_key = _credentials(request, params)
    if isinstance(api_key, Response):
        return api_key
    for name in ("from", "to", "text"):
        if not params.get(name):
            return vonage_error("2", f"Missing {name} param")
    to, sender, text = params["to"], params["from"], params["text"]
    if not NUMBER.fullmatch(to):
        return vonage_error("3", "Invalid to address")
    client_ref = params.get("client-ref") or None
    if client_ref is not None and len(client_ref) > 100:
        return vonage_error("3", "Invalid client-ref")

    error = await decide(store, "vonage")
    if error == "timeout":
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    if error is not None:
        return vonage_error(*SCRIPTED[error])

    callback = params.get("callback") or None
    message = new_message(
        "vonage",
        secrets.token_hex(8).upper(),
        to=_e164(to),
        sender=_e164(sender),
        body=text,
        account=api_key,
        status="accepted",
        clientRef=client_ref,
        callback=callback,
        type=params.get("type") or "text",
    )
    store.record(message)
    if callback and store.behaviour.callbacks:
        store.spawn(_receipt(store, message, callback, sender=sender))
    answer = {
        "to": to.removeprefix("+"),
        "message-id": message["id"],
        "status": "0",
        "remaining-balance": "10.00",
        "message-price": "0.0333",
        "network": NETWORK,
    }
    if client_ref is not None:
        answer["client-ref"] = client_ref
    return vonage_answer([answer])


def signed_form(
    params: Mapping[str, str], api_key: str, signature_secret: str
) -> tuple[bytes, dict[str, str]]:
    """A webhook body as Vonage posts it, `sig` over the others by the SDK's own code."""
    fields = dict(params)
    signer = Auth(api_key=api_key, signature_secret=signature_secret, signature_method="sha256")
    fields["sig"] = str(signer.sign_params(dict(fields)))
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Vonage-DLR"}
    return urlencode(fields).encode(), headers


def _stamps() -> dict[str, str]:
    now = utc_now()
    return {
        "message-timestamp": now.strftime("%Y-%m-%d %H:%M:%S"),
        "timestamp": str(int(now.timestamp())),
        "nonce": str(uuid.uuid4()),
    }


async def _receipt(store: Store, message: dict[str, Any], url: str, *, sender: str) -> None:
    """The delivery receipt, once the handset has (or has not) got the message."""
    await asyncio.sleep(store.behaviour.delivery_delay_ms / 1000)
    status = vonage_final_status(store.behaviour.final_status)
    set_status(message, status)
    params = {
        "msisdn": message["to"].removeprefix("+"),
        "to": sender,
        "network-code": NETWORK,
        "messageId": message["id"],
        "price": PRICE,
        "status": status,
        "scts": utc_now().strftime("%y%m%d%H%M"),
        "err-code": DLR_ERROR_CODES.get(status, "0" if status == "delivered" else "99"),
        "api-key": message["account"],
        **_stamps(),
    }
    if message["clientRef"] is not None:
        params["client-ref"] = message["clientRef"]
    body, headers = signed_form(params, message["account"], store.secret)
    await post_callback(store, url, body, headers)


def inbound_params(api_key: str, sender: str, to: str, text: str) -> dict[str, str]:
    """An incoming SMS webhook's parameters (before `sig`), as Vonage posts them."""
    words = text.split()
    return {
        "msisdn": sender.removeprefix("+"),
        "to": to.removeprefix("+"),
        "messageId": secrets.token_hex(8).upper(),
        "text": text,
        "type": "text",
        "keyword": words[0].upper() if words else "",
        "api-key": api_key,
        **_stamps(),
    }


ROUTES: Final = [vonage_send]
