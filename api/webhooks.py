"""Twilio and Vonage webhooks: delivery status and inbound SMS (STOP / START).

Every request is verified with the provider's own signature scheme and the secret of the
provider settings it names (AccountSid, api-key); unsigned or badly signed ones get 403 and
change nothing. Status reports go through the one lifecycle, so order and repeats are safe."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Request, Response, route
from litestar.datastructures import State
from litestar.exceptions import ClientException, PermissionDeniedException
from litestar.params import HeaderParameter, QueryParameter
from sqlalchemy.orm import Session

from api.openapi import documented, text
from api.placement import Placement
from shared.accounts import provider_account_by
from shared.lifecycle import StatusReport, apply_status, find_sid
from shared.models import MessageStatus, ProviderAccount, utcnow
from shared.optout import handle_inbound
from shared.providers import twilio, vonage

log = structlog.get_logger(__name__)

FORBIDDEN = text("Missing or wrong signature: nothing is applied", "Invalid signature")
BAD_STATUS = text("A status we do not know", "missing or invalid parameter status")
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

MessageSid = Annotated[
    str | None,
    QueryParameter(name="messageSid", description="Ours, in the callback URL we gave the provider"),
]
TwilioSignature = Annotated[
    str | None, HeaderParameter(name=twilio.SIGNATURE_HEADER, description="Twilio's signature")
]


async def _params(
    request: Request[object, object, State], *, with_query: bool = True
) -> dict[str, str]:
    """A webhook's parameters: query string, form or JSON body, as the provider sent them.

    Twilio signs the URL (query included) plus the POST parameters, so for it the query
    string stays out of the parameters."""
    params = {key: str(value) for key, value in request.query_params.items()} if with_query else {}
    if request.method == "POST":
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                body = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                raise ClientException("missing or invalid parameter body") from None
            if isinstance(body, dict):
                params.update({key: str(value) for key, value in body.items()})
        else:
            form = await request.form()
            params.update({key: str(value) for key, value in form.items()})
    return params


def _public_url(placement: Placement, request: Request[object, object, State]) -> str:
    # Providers sign the URL they called: ours as the public base URL says, not as proxied.
    url = placement.settings.public_base_url.rstrip("/") + request.url.path
    return url + ("?" + request.url.query if request.url.query else "")


def _verified(
    session: Session,
    provider: str,
    credential: str,
    value: str | None,
    check: Callable[[Mapping[str, Any]], bool],
) -> ProviderAccount:
    settings = provider_account_by(session, provider, credential, value)
    if settings is None or not check(settings.credentials or {}):
        log.warning("webhook.bad_signature", provider=provider, credential=value)
        raise PermissionDeniedException("Invalid signature")
    return settings


def _number(raw: str | None) -> str:
    # Vonage writes numbers without the leading +; everything we store is E.164.
    value = (raw or "").strip()
    return "+" + value if value.isdigit() else value


def _report(
    session: Session,
    provider: str,
    sid: str | None,
    provider_message_id: str | None,
    status_word: str | None,
    statuses: Mapping[str, MessageStatus],
    error_code: str | None,
    params: dict[str, str],
    now: datetime,
) -> None:
    status = statuses.get((status_word or "").lower())
    if status is None:
        raise ClientException("missing or invalid parameter status")
    matched = sid or find_sid(session, provider, provider_message_id)
    structlog.contextvars.bind_contextvars(messageSid=matched)
    report = StatusReport(
        status,
        source="callback",
        provider=provider,
        provider_status=status_word,
        provider_message_id=provider_message_id,
        error_code=error_code if error_code not in (None, "", "0") else None,
        payload={key: value for key, value in params.items() if key != "sig"},
    )
    apply_status(session, matched, report, now)


@route(
    "/callbacks/twilio",
    http_method=["POST"],
    status_code=204,
    summary="Twilio status callback",
    description="StatusCallback of messages sent through Twilio (X-Twilio-Signature checked).",
    tags=["Provider callbacks"],
    operation_class=documented(errors={400: BAD_STATUS, 403: FORBIDDEN}),
)
async def twilio_status(
    request: Request[object, object, State],
    message_sid: MessageSid = None,
    signature: TwilioSignature = None,
) -> None:
    placement: Placement = request.app.state.placement
    params = await _params(request, with_query=False)
    url = _public_url(placement, request)

    def apply() -> None:
        with placement.db.transaction() as session:
            _verified(
                session,
                "twilio",
                "account_sid",
                params.get("AccountSid"),
                lambda creds: twilio.verify_webhook(creds, url, params, signature),
            )
            _report(
                session,
                "twilio",
                message_sid,
                params.get("MessageSid"),
                params.get("MessageStatus"),
                twilio.TWILIO_STATUSES,
                params.get("ErrorCode"),
                params,
                utcnow(),
            )

    await anyio.to_thread.run_sync(apply)


@route(
    "/callbacks/vonage",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage delivery receipt",
    description="Delivery receipts (DLR) of messages sent through Vonage (`sig` checked).",
    tags=["Provider callbacks"],
    operation_class=documented(errors={400: BAD_STATUS, 403: FORBIDDEN}),
)
async def vonage_receipt(
    request: Request[object, object, State], message_sid: MessageSid = None
) -> None:
    placement: Placement = request.app.state.placement
    params = await _params(request)
    params.pop("messageSid", None)  # ours, added to the URL; not part of what Vonage signed

    def apply() -> None:
        with placement.db.transaction() as session:
            _verified(
                session,
                "vonage",
                "api_key",
                params.get("api-key"),
                lambda creds: vonage.verify_webhook(creds, params),
            )
            _report(
                session,
                "vonage",
                message_sid or params.get("client-ref") or None,
                params.get("messageId"),
                params.get("status"),
                vonage.VONAGE_STATUSES,
                params.get("err-code"),
                params,
                utcnow(),
            )

    await anyio.to_thread.run_sync(apply)


@route(
    "/inbound/twilio",
    http_method=["POST"],
    summary="Twilio inbound SMS",
    description="STOP-family keywords opt the sender out of our number; START/UNSTOP opt back in.",
    tags=["Provider callbacks"],
    operation_class=documented(errors={403: FORBIDDEN}),
    media_type="text/xml",
)
async def twilio_inbound(
    request: Request[object, object, State], signature: TwilioSignature = None
) -> Response[str]:
    placement: Placement = request.app.state.placement
    params = await _params(request, with_query=False)
    url = _public_url(placement, request)

    def apply() -> None:
        with placement.db.transaction() as session:
            settings = _verified(
                session,
                "twilio",
                "account_sid",
                params.get("AccountSid"),
                lambda creds: twilio.verify_webhook(creds, url, params, signature),
            )
            handle_inbound(
                session,
                settings.account_id,
                sender=_number(params.get("To")),
                recipient=_number(params.get("From")),
                text=params.get("Body", ""),
                now=utcnow(),
            )

    await anyio.to_thread.run_sync(apply)
    # An empty TwiML answer: we reply nothing (Twilio itself answers STOP on its numbers).
    return Response(EMPTY_TWIML, media_type="text/xml")


@route(
    "/inbound/vonage",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage inbound SMS",
    description="STOP-family keywords opt the sender out of our number; START/UNSTOP opt back in.",
    tags=["Provider callbacks"],
    operation_class=documented(errors={403: FORBIDDEN}),
)
async def vonage_inbound(request: Request[object, object, State]) -> None:
    placement: Placement = request.app.state.placement
    params = await _params(request)

    def apply() -> None:
        with placement.db.transaction() as session:
            settings = _verified(
                session,
                "vonage",
                "api_key",
                params.get("api-key"),
                lambda creds: vonage.verify_webhook(creds, params),
            )
            handle_inbound(
                session,
                settings.account_id,
                sender=_number(params.get("to")),
                recipient=_number(params.get("msisdn")),
                text=params.get("text", ""),
                now=utcnow(),
            )

    await anyio.to_thread.run_sync(apply)


WEBHOOKS = [twilio_status, vonage_receipt, twilio_inbound, vonage_inbound]
