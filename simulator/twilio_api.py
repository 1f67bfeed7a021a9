"""Enough of Twilio's Programmable Messaging API for the official `twilio` SDK: send and fetch
a Message, status callbacks and inbound-SMS webhooks signed with X-Twilio-Signature."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Final
from urllib.parse import urlencode

from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

from simulator.state import (
    TIMEOUT_BODY,
    Store,
    count_segments,
    decide,
    new_message,
    post_callback,
    set_status,
    store_of,
    twilio_final_status,
)

API_VERSION: Final = "2010-04-01"
SIGNATURE_HEADER: Final = "X-Twilio-Signature"
ACCOUNT_PATH: Final = f"/{API_VERSION}/Accounts/{{account_sid:str}}"
# Loose E.164: Twilio refuses what cannot be a phone number with 21211.
PHONE = re.compile(r"\+?[1-9]\d{5,14}")
# What undelivered and failed messages carry as ErrorCode (unreachable handset, unknown error).
STATUS_ERROR_CODES: Final = {"undelivered": 30003, "failed": 30008}

SCRIPTED: Final[dict[str, tuple[int, int, str]]] = {
    "throttled": (429, 20429, "Too Many Requests"),
    "server_error": (500, 20500, "An internal server error has occurred"),
    "invalid_number": (400, 21211, "The 'To' number {to} is not a valid phone number."),
    "opted_out": (400, 21610, "Attempt to send to unsubscribed recipient"),
}


def twilio_error(code: int, message: str, status: int) -> Response[Any]:
    """An error as Twilio's REST API words it (the SDK's TwilioRestException reads it)."""
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return Response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
        headers=headers,
    )


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


def _authenticate(request: Request[Any, Any, State], account_sid: str) -> str | Response[Any]:
    """The auth token the request authenticated with, or the 401 to answer.

    Any token is accepted for any AccountSid (this is a stand-in, not a vault); the user must
    be the AccountSid in the URL, or an API key (SK...) acting for it."""
    credentials = _basic_auth(request)
    if credentials is None:
        return twilio_error(20003, "Authenticate", 401)
    user, token = credentials
    if user != account_sid and not user.startswith("SK"):
        return twilio_error(20003, "Authenticate", 401)
    return token


async def _form(request: Request[Any, Any, State]) -> dict[str, str]:
    form = await request.form()
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _rfc2822(iso: str | None) -> str | None:
    return format_datetime(datetime.fromisoformat(iso)) if iso else None


def message_resource(message: Mapping[str, Any]) -> dict[str, Any]:
    """The Message resource as Twilio returns it (the SDK's MessageInstance parses it)."""
    uri = f"/{API_VERSION}/Accounts/{message['account']}/Messages/{message['id']}.json"
    status = message["status"]
    return {
        "account_sid": message["account"],
        "api_version": API_VERSION,
        "body": message["body"],
        "date_created": _rfc2822(message["createdAt"]),
        "date_sent": _rfc2822(message["updatedAt"])
        if status in ("sent", "delivered", "undelivered")
        else None,
        "date_updated": _rfc2822(message["updatedAt"]),
        "direction": "outbound-api",
        "error_code": message.get("errorCode"),
        "error_message": None,
        "from": message["from"],
        "messaging_service_sid": message.get("messagingServiceSid"),
        "num_media": "0",
        "num_segments": str(message["segments"]),
        "price": None,
        "price_unit": "USD",
        "sid": message["id"],
        "status": status,
        "subresource_uris": {
            "media": uri.removesuffix(".json") + "/Media.json",
            "feedback": uri.removesuffix(".json") + "/Feedback.json",
        },
        "to": message["to"],
        "uri": uri,
    }


@post(f"{ACCOUNT_PATH}/Messages.json", status_code=201)
async def twilio_send(
    request: Request[Any, Any, State], account_sid: FromPath[str]
) -> Response[Any]:
    """Create a Message: form fields To, From (or MessagingServiceSid), Body,
    StatusCallback, ValidityPeriod."""
    store = store_of(request)
    store.count_request("twilio")
    token = _authenticate(request, account_sid)
    if isinstance(token, Response):
        return token
    form = await _form(request)
    to, sender, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
    service = form.get("MessagingServiceSid") or None
    if not to:
        return twilio_error(21604, "A 'To' phone number is required.", 400)
    if not sender and not service:
        return twilio_error(21603, "A 'From' phone number is required.", 400)
    if not body:
        return twilio_error(21602, "Message body is required.", 400)
    if not PHONE.fullmatch(to):
        return twilio_error(21211, f"Invalid 'To' Phone Number: {to}", 400)
    validity: int | None = None
    if form.get("ValidityPeriod"):
        try:
            validity = int(form["ValidityPeriod"])
        except ValueError:
            validity = 0
        if not 1 <= validity <= 36_000:
            return twilio_error(21624, "Invalid validity period value", 400)

    error = await decide(store, "twilio")
    if error == "timeout":
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    if error is not None:
        status, code, text = SCRIPTED[error]
        return twilio_error(code, text.format(to=to), status)

    callback = form.get("StatusCallback") or None
    message = new_message(
        "twilio",
        "SM" + uuid.uuid4().hex,
        to=to,
        sender=sender,
        body=body,
        account=account_sid,
        # Through a Messaging Service Twilio first says "accepted", then picks a sender.
        status="accepted" if service and not sender else "queued",
        messagingServiceSid=service,
        statusCallback=callback,
        validityPeriod=validity,
        errorCode=None,
    )
    store.record(message)
    if callback and store.behaviour.callbacks:
        store.spawn(_report(store, message, callback, token))
    return Response(message_resource(message), status_code=201)


@get(f"{ACCOUNT_PATH}/Messages/{{resource:str}}")
async def twilio_fetch(
    request: Request[Any, Any, State], account_sid: FromPath[str], resource: FromPath[str]
) -> Response[Any]:
    """Fetch a Message (`/Messages/SM....json`), so `client.messages(sid).fetch()` works."""
    token = _authenticate(request, account_sid)
    if isinstance(token, Response):
        return token
    message = store_of(request).messages.get(resource.removesuffix(".json"))
    if message is None or message["provider"] != "twilio" or message["account"] != account_sid:
        return twilio_error(20404, f"The requested resource {request.url.path} was not found", 404)
    return Response(message_resource(message), status_code=200)


def signed_form(
    url: str, params: Mapping[str, str], auth_token: str
) -> tuple[bytes, dict[str, str]]:
    """A webhook body and headers as Twilio sends them, X-Twilio-Signature included."""
    signature = RequestValidator(auth_token).compute_signature(url, dict(params))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "TwilioProxy/1.1",
        SIGNATURE_HEADER: str(signature),
    }
    return urlencode(params).encode(), headers


async def _report(store: Store, message: dict[str, Any], url: str, auth_token: str) -> None:
    """Status callbacks as Twilio makes them: `sent`, then the final status."""
    delay = store.behaviour.delivery_delay_ms / 2000
    await asyncio.sleep(delay)
    for status in ("sent", twilio_final_status(store.behaviour.final_status)):
        set_status(message, status)
        params = {
            "ApiVersion": API_VERSION,
            "AccountSid": message["account"],
            "MessageSid": message["id"],
            "SmsSid": message["id"],
            "From": message["from"],
            "To": message["to"],
            "MessageStatus": status,
            "SmsStatus": status,
        }
        if message.get("messagingServiceSid"):
            params["MessagingServiceSid"] = message["messagingServiceSid"]
        if status in STATUS_ERROR_CODES:
            message["errorCode"] = STATUS_ERROR_CODES[status]
            params["ErrorCode"] = str(STATUS_ERROR_CODES[status])
        body, headers = signed_form(url, params, auth_token)
        await post_callback(store, url, body, headers)
        await asyncio.sleep(delay)


def inbound_params(account_sid: str, sender: str, to: str, text: str) -> dict[str, str]:
    """An incoming SMS webhook's parameters, as Twilio posts them to a number's SMS URL."""
    sid = "SM" + uuid.uuid4().hex
    return {
        "ApiVersion": API_VERSION,
        "AccountSid": account_sid,
        "MessageSid": sid,
        "SmsSid": sid,
        "SmsMessageSid": sid,
        "SmsStatus": "received",
        "From": sender,
        "To": to,
        "Body": text,
        "NumMedia": "0",
        "NumSegments": str(count_segments(text)),
    }


ROUTES: Final = [twilio_send, twilio_fetch]
