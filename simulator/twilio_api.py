"""Enough of Twilio's Programmable Messaging API for the official `twilio` SDK: send and fetch
a Message, status callbacks and inbound-SMS webhooks signed with X-Twilio-Signature.

Callbacks can be made as real ones come (see Behaviour): intermediate statuses, out of
order, repeated with the same I-Twilio-Idempotency-Token, with an ErrorCode on the final one;
errors can be answered in the classic body or as RFC 9457 problem details."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from email.utils import format_datetime
from typing import Any, Final
from urllib.parse import urlencode

from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

from simulator.state import (
    TAKEN_ANYWAY,
    TIMEOUT_BODY,
    Callback,
    Store,
    answer_taken,
    basic_auth,
    callback_statuses,
    count_segments,
    decide,
    delivery_steps,
    gateway_answer,
    hold,
    new_message,
    set_status,
    store_of,
)

API_VERSION: Final = "2010-04-01"
SIGNATURE_HEADER: Final = "X-Twilio-Signature"
# The same on every retry of one webhook, so a receiver can tell a repeat from a new event.
IDEMPOTENCY_TOKEN_HEADER: Final = "I-Twilio-Idempotency-Token"  # noqa: S105 - a header name
ACCOUNT_PATH: Final = f"/{API_VERSION}/Accounts/{{account_sid:str}}"
# Loose E.164: Twilio refuses what cannot be a phone number with 21211.
PHONE = re.compile(r"\+?[1-9]\d{5,14}")
# What undelivered and failed messages carry as ErrorCode (unreachable handset, unknown error).
STATUS_ERROR_CODES: Final = {"undelivered": 30003, "failed": 30008}
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000

SCRIPTED: Final[dict[str, tuple[int, int, str]]] = {
    "throttled": (429, 20429, "Too Many Requests"),
    "server_error": (500, 20500, "An internal server error has occurred"),
    "invalid_number": (400, 21211, "The 'To' number {to} is not a valid phone number."),
    "opted_out": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "sender_queue_full": (
        400,
        21611,
        "This 'From' number has exceeded the maximum number of queued messages",
    ),
    "queue_overflow": (400, 30001, "Queue overflow"),
    "too_many_binds": (429, 20429, "Too Many Requests"),
    "unavailable": (503, 20503, "Service Unavailable"),
}


def twilio_error(
    code: int, message: str, status: int, request: Request[Any, Any, State] | None = None
) -> Response[Any]:
    """An error as Twilio's REST API words it: the classic body (the SDK's
    TwilioRestException), or RFC 9457 problem details (its TwilioServiceException) when
    /control's error_format says so."""
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    info = f"https://www.twilio.com/docs/errors/{code}"
    if request is not None and store_of(request).behaviour.error_format == "rfc9457":
        problem = {
            "type": info,
            "title": message,
            "status": status,
            "code": code,
            "detail": message,
            "instance": request.url.path,
        }
        return Response(
            problem, status_code=status, headers=headers, media_type="application/problem+json"
        )
    return Response(
        {"code": code, "message": message, "more_info": info, "status": status},
        status_code=status,
        headers=headers,
    )


def _authenticate(request: Request[Any, Any, State], account_sid: str) -> str | Response[Any]:
    """The auth token the request authenticated with, or the 401 to answer.

    Any token is accepted for any AccountSid (this is a stand-in, not a vault); the user must
    be the AccountSid in the URL, or an API key (SK...) acting for it."""
    credentials = basic_auth(request)
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
        "date_sent": _rfc2822(message.get("sentAt")),
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
    if (gateway := gateway_answer(error)) is not None:
        return gateway
    if error == "blackhole":
        await hold(request)
        return Response(TIMEOUT_BODY, status_code=504, media_type=MediaType.TEXT)
    if error is not None and error not in TAKEN_ANYWAY:
        status, code, text = SCRIPTED[error]
        return twilio_error(code, text.format(to=to), status, request)

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
    if callback and store.callbacks_on("twilio"):
        _report(store, message, callback, token)
    else:
        store.deliver_silently(message, callback_statuses(store.behaviour)[1])
    return await answer_taken(store, error, Response(message_resource(message), status_code=201))


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
        return twilio_error(
            20404, f"The requested resource {request.url.path} was not found", 404, request
        )
    return Response(message_resource(message), status_code=200)


@get(f"{ACCOUNT_PATH}/Messages.json")
async def twilio_list(
    request: Request[Any, Any, State], account_sid: FromPath[str]
) -> Response[Any]:
    """List the account's Messages, newest first, as Twilio pages them: filters To, From,
    DateSent, DateSent< and DateSent> (day-granular, inclusive, on date_sent, as Twilio
    reads them: a message not yet sent has no date_sent and matches no DateSent filter),
    PageSize (50 by default, at most 1000) and Page; `next_page_uri` leads on."""
    token = _authenticate(request, account_sid)
    if isinstance(token, Response):
        return token
    query = {name: str(value) for name, value in request.query_params.items()}
    try:
        page_size = min(max(int(query.get("PageSize") or DEFAULT_PAGE_SIZE), 1), MAX_PAGE_SIZE)
        page = max(int(query.get("Page") or 0), 0)
    except ValueError:
        return twilio_error(20001, "Invalid paging parameter", 400, request)
    days = {}
    for name in ("DateSent", "DateSent<", "DateSent>"):
        if query.get(name):
            try:
                days[name] = date.fromisoformat(query[name][:10])
            except ValueError:
                return twilio_error(20001, f"Invalid {name}", 400, request)
    found = []
    for message in store_of(request).messages.values():
        if message["provider"] != "twilio" or message["account"] != account_sid:
            continue
        if query.get("To") and message["to"] != query["To"]:
            continue
        if query.get("From") and message["from"] != query["From"]:
            continue
        if days:
            sent = message.get("sentAt")
            day = datetime.fromisoformat(sent).date() if sent else None
            if day is None:
                continue
            if "DateSent" in days and day != days["DateSent"]:
                continue
            if "DateSent<" in days and day > days["DateSent<"]:
                continue
            if "DateSent>" in days and day < days["DateSent>"]:
                continue
        found.append(message)
    found.reverse()  # newest first, as Twilio lists
    records = found[page * page_size : (page + 1) * page_size]
    path = request.url.path
    kept = {name: value for name, value in query.items() if name not in ("Page", "PageToken")}

    def uri(number: int) -> str:
        params = urlencode({**kept, "PageSize": page_size, "Page": number})
        return f"{path}?{params}"

    more = (page + 1) * page_size < len(found)
    return Response(
        {
            "messages": [message_resource(message) for message in records],
            "end": page * page_size + max(len(records) - 1, 0),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1) if more else None,
            "page": page,
            "page_size": page_size,
            "previous_page_uri": uri(page - 1) if page > 0 else None,
            "start": page * page_size,
            "uri": uri(page),
        },
        status_code=200,
    )


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


def _report(store: Store, message: dict[str, Any], url: str, auth_token: str) -> None:
    """Status callbacks as Twilio makes them: by default `sent`, then the final status."""
    behaviour = store.behaviour
    scripted_code = behaviour.final_error_code

    def build(reported: str, happened: str) -> Callback:
        set_status(message, happened)
        params = {
            "ApiVersion": API_VERSION,
            "AccountSid": message["account"],
            "MessageSid": message["id"],
            "SmsSid": message["id"],
            "From": message["from"],
            "To": message["to"],
            "MessageStatus": reported,
            "SmsStatus": reported,
        }
        if message.get("messagingServiceSid"):
            params["MessagingServiceSid"] = message["messagingServiceSid"]
        if reported in STATUS_ERROR_CODES:
            code = scripted_code or STATUS_ERROR_CODES[reported]
            message["errorCode"] = code
            params["ErrorCode"] = str(code)
        body, headers = signed_form(url, params, auth_token)
        headers[IDEMPOTENCY_TOKEN_HEADER] = f"{uuid.uuid4()}-{int(time.time())}"
        return Callback("POST", url, body, headers)

    store.deliver(delivery_steps(behaviour, build), behaviour.callback_repeats)


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


ROUTES: Final = [twilio_send, twilio_list, twilio_fetch]
