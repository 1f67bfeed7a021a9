"""Enough of Vonage's SMS API for the official `vonage` SDK: `POST /sms/json`, delivery
receipts and inbound-SMS webhooks.

A long text is split as Vonage splits it (over 160 GSM-7 or 70 UCS-2 characters: parts of
153 or 67), one `messages[]` entry and one delivery receipt per part. For an api_key
registered through POST /control/vonage/accounts, requests must carry its api_secret or a
valid `sig` (status 14 otherwise), and receipts and inbound webhooks are signed with its
method (md5hash, md5, sha1, sha256, sha512); others are taken on trust and get unsigned
receipts, as a Vonage account without a signature secret does. Receipts go as POST form,
GET query or POST JSON (/control's receipt_format)."""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlencode

from litestar import MediaType, Request, Response, post
from litestar.datastructures import State

from shared.providers.vonage import signature
from simulator.state import (
    TIMEOUT_BODY,
    Callback,
    Store,
    VonageAccount,
    answer_taken,
    basic_auth,
    count_segments,
    decide,
    gateway_answer,
    hold,
    new_message,
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
    "sender_queue_full": ("1", "Throughput Rate Exceeded - please wait [ 1000 ] and retry"),
    "queue_overflow": ("1", "Throughput Rate Exceeded - please wait [ 1000 ] and retry"),
    "too_many_binds": ("10", "Too many existing binds"),
}
# What the later parts of a `partial_failure` send are refused with.
PART_REFUSED: Final = ("1", "Throughput Rate Exceeded - please wait [ 1000 ] and retry")
INVALID_SIGNATURE: Final = ("14", "Invalid Signature")
SIGNATURE_MAX_AGE_SECONDS = 300
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


def _credentials(
    request: Request[Any, Any, State], params: Mapping[str, str]
) -> str | Response[Any]:
    """The api_key the request authenticated as, or the refusal to answer.

    Accepts api_key + api_secret (form or query), HTTP Basic api_key:api_secret (what the
    v4 SDK sends), or api_key + sig + timestamp (signed requests). For a registered account
    the secret must match, and when it has a signature secret every request must be signed
    with it (status 14 otherwise); an unknown api_key is taken on trust."""
    basic = basic_auth(request)
    api_key = basic[0] if basic is not None else params.get("api_key")
    if not api_key:
        return vonage_error("2", "Missing api_key")
    account = store_of(request).vonage_accounts.get(api_key)
    sig = params.get("sig")
    if account is not None and account.signature_secret and (sig or account.require_signature):
        return api_key if _signed(params, account) else vonage_error(*INVALID_SIGNATURE)
    if sig:
        if account is not None:  # signed, but the account has no secret to check it with
            return vonage_error(*INVALID_SIGNATURE)
        return api_key if params.get("timestamp") else vonage_error(*INVALID_SIGNATURE)
    secret = basic[1] if basic is not None else params.get("api_secret")
    if not secret or (account is not None and account.api_secret not in (None, secret)):
        return vonage_error("4", "Bad Credentials")
    return api_key


def _signed(params: Mapping[str, str], account: VonageAccount) -> bool:
    sig, timestamp = params.get("sig"), params.get("timestamp", "")
    if not sig or not timestamp.isdigit() or account.signature_secret is None:
        return False
    if abs(time.time() - int(timestamp)) > SIGNATURE_MAX_AGE_SECONDS:
        return False
    signed = {name: value for name, value in params.items() if name != "sig"}
    expected = signature(signed, account.signature_secret, account.signature_method)
    return hmac.compare_digest(expected, sig.lower())


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
    if error == "unavailable":  # Vonage's front door: nothing was processed
        error = "http_503"
    if (gateway := gateway_answer(error)) is not None:
        return gateway
    if error == "blackhole":
        await hold(request)
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    refusal = SCRIPTED.get(error or "")
    parts = count_segments(text)
    if refusal is not None and parts == 1:
        return vonage_error(*refusal)
    # Every part refused by a scripted error, the later ones by a partial failure.
    taken = 0 if refusal is not None else 1 if error == "partial_failure" else parts
    part_ids = [secrets.token_hex(8).upper() for _ in range(taken)]
    answers: list[dict[str, str]] = []
    for part_id in part_ids:
        answer = {
            "to": to.removeprefix("+"),
            "message-id": part_id,
            "status": "0",
            "remaining-balance": "10.00",
            "message-price": "0.0333",
            "network": NETWORK,
        }
        if client_ref is not None:
            answer["client-ref"] = client_ref
        answers.append(answer)
    code, error_text = refusal or PART_REFUSED
    answers += [{"status": code, "error-text": error_text}] * (parts - taken)
    if not part_ids:
        return vonage_answer(answers)

    callback = params.get("callback") or None
    message = new_message(
        "vonage",
        part_ids[0],
        to=_e164(to),
        sender=_e164(sender),
        body=text,
        account=api_key,
        status="accepted",
        clientRef=client_ref,
        callback=callback,
        type=params.get("type") or "text",
        parts=part_ids,
        unsentParts=parts - taken,
    )
    store.record(message)
    if callback and store.callbacks_on("vonage"):
        for part_id in part_ids:
            _receipt(store, message, part_id, callback, sender=sender)
    else:
        store.deliver_silently(message, [vonage_final_status(store.behaviour.final_status)])
    return await answer_taken(store, error, vonage_answer(answers))


def sign_webhook(params: Mapping[str, str], account: VonageAccount | None) -> dict[str, str]:
    """A webhook's parameters as Vonage sends them: with `sig` over the others (timestamp
    included) in the account's method when it has a signature secret, else unsigned."""
    fields = dict(params)
    if account is not None and account.signature_secret:
        fields["sig"] = signature(fields, account.signature_secret, account.signature_method)
    return fields


def signed_form(
    params: Mapping[str, str], account: VonageAccount | None
) -> tuple[bytes, dict[str, str]]:
    """A webhook body as Vonage posts it (see sign_webhook)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Vonage-DLR"}
    return urlencode(sign_webhook(params, account)).encode(), headers


def webhook_request(
    url: str, params: Mapping[str, str], account: VonageAccount | None, receipt_format: str
) -> Callback:
    """A delivery receipt in the account's configured shape: GET query, POST form or JSON."""
    if receipt_format == "get":
        query = urlencode(sign_webhook(params, account))
        separator = "&" if "?" in url else "?"
        return Callback("GET", f"{url}{separator}{query}", None, {"User-Agent": "Vonage-DLR"})
    if receipt_format == "post_json":
        body = json.dumps(sign_webhook(params, account)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "Vonage-DLR"}
        return Callback("POST", url, body, headers)
    body, headers = signed_form(params, account)
    return Callback("POST", url, body, headers)


def _stamps() -> dict[str, str]:
    now = utc_now()
    return {
        "message-timestamp": now.strftime("%Y-%m-%d %H:%M:%S"),
        "timestamp": str(int(now.timestamp())),
        "nonce": str(uuid.uuid4()),
    }


def _receipt(store: Store, message: dict[str, Any], part_id: str, url: str, *, sender: str) -> None:
    """A part's delivery receipt, once the handset has (or has not) got it."""
    behaviour = store.behaviour
    status = vonage_final_status(behaviour.final_status)
    account = store.vonage_accounts.get(message["account"])
    receipt_format = behaviour.receipt_format

    def build() -> Callback:
        set_status(message, status)
        params = {
            "msisdn": message["to"].removeprefix("+"),
            "to": sender,
            "network-code": NETWORK,
            "messageId": part_id,
            "price": PRICE,
            "status": status,
            "scts": utc_now().strftime("%y%m%d%H%M"),
            "err-code": DLR_ERROR_CODES.get(status, "0" if status == "delivered" else "99"),
            "api-key": message["account"],
            **_stamps(),
        }
        if message["clientRef"] is not None:
            params["client-ref"] = message["clientRef"]
        return webhook_request(url, params, account, receipt_format)

    store.deliver([(behaviour.delivery_delay_ms / 1000, build)])


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
