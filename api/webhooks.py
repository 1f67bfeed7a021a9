"""Provider webhooks: delivery status (Twilio, Vonage, the simulator) and inbound SMS (STOP).

A webhook may change only what belongs to the provider account that signed it. The message
it names is looked up first; its own provider account must be the one the webhook names
(AccountSid, api-key, accountId) and that account's secret must verify it. A webhook naming
no message of ours is verified against the provider accounts of that public id and stored
unmatched. Anything else is a forgery: 403, logged, nothing changed. Signed timestamps older
than SMSD_WEBHOOK_MAX_AGE are refused, and a repeated callback is stored once.

Bodies are capped at `MAX_BODY_BYTES` while they are read, before any signature is checked."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl

import msgspec
import structlog
from litestar import Request, Response, route
from litestar.datastructures import State
from litestar.exceptions import ClientException, PermissionDeniedException
from litestar.params import HeaderParameter, PathParameter, QueryParameter
from sqlalchemy.orm import Session

from api.dependencies import CallbacksDep
from api.openapi import documented, json_object, string, text
from shared.accounts.access import callback_tokens, provider_accounts_named
from shared.core.models import Message, MessageStatus, ProviderAccount, utcnow
from shared.core.settings import Settings
from shared.messages.callback_groups import CallbackGroups
from shared.messages.lifecycle import (
    StatusMove,
    StatusReport,
    apply_part_status,
    apply_status,
    apply_status_batch,
    find_sid,
)
from shared.messages.optout import add_opt_out, handle_inbound
from shared.messages.queries import callback_targets, message_by_sid, provider_account_by_id
from shared.providers import simulator, twilio, vonage

log = structlog.get_logger(__name__)

# Real webhooks are a few hundred bytes; Litestar stops reading past this and answers 413.
MAX_BODY_BYTES = 64 * 1024

FORBIDDEN = text(
    "Missing, wrong, stale or another provider account's signature: nothing is applied",
    "Invalid signature",
)
BAD_STATUS = text(
    "A status we do not know, a body that is not a form or JSON object, or a malformed path",
    "missing or invalid parameter status",
)
BAD_BODY = text(
    "A body that is not a form or JSON object, or a malformed path",
    "missing or invalid parameter body",
)
TOO_LARGE = text(
    f"A body over {MAX_BODY_BYTES} bytes (not read further)", "Request Entity Too Large"
)
WEBHOOK_ERRORS = {400: BAD_STATUS, 403: FORBIDDEN, 413: TOO_LARGE}
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

MessageSid = Annotated[
    str | None,
    QueryParameter(name="messageSid", description="Ours, in the callback URL we gave the provider"),
]
TwilioSignature = Annotated[
    str | None, HeaderParameter(name=twilio.SIGNATURE_HEADER, description="Twilio's signature")
]
CallbackToken = Annotated[
    str,
    PathParameter(
        description="The provider account's callback token (a secret; rotatable)", max_length=64
    ),
]
TwilioIdempotency = Annotated[
    str | None,
    HeaderParameter(
        name="I-Twilio-Idempotency-Token", description="The same on Twilio's retries of a callback"
    ),
]

Check = Callable[[Mapping[str, Any]], bool]


class Forged(PermissionDeniedException):
    """A webhook that no provider account it could come from has signed."""

    def __init__(self, reason: str, **context: Any) -> None:
        log.warning("webhook.refused", reason=reason, **context)
        super().__init__("Invalid signature")


@dataclass(frozen=True, slots=True)
class Target:
    """The message a verified webhook may change (None: it names none of ours), and the
    provider account whose secret verified it."""

    message: Message | None
    signer: ProviderAccount


def bound_to_signer(
    session: Session, provider: str, sid: str | None, public_id: str | None, check: Check
) -> Target:
    """The message `sid` and its provider account, if that account signed the webhook.

    The message's own provider account decides, never the one the webhook names: a tenant
    with settings of its own can sign anything with its secret, but only its messages."""
    message = message_by_sid(session, sid) if sid else None
    if message is not None:
        signer = provider_account_by_id(session, message.provider_account_id)
        if (
            signer is None
            or signer.provider != provider
            or signer.public_id != public_id
            or not check(signer.credentials or {})
        ):
            raise Forged("not signed by the message's provider account", provider=provider)
        return Target(message, signer)
    for candidate in provider_accounts_named(session, provider, public_id):
        if check(candidate.credentials or {}):
            return Target(None, candidate)
    raise Forged("no provider account of that id signed it", provider=provider)


def signers(
    session: Session, provider: str, public_id: str | None, check: Check
) -> list[ProviderAccount]:
    """Every provider account of that public id whose secret verifies the webhook."""
    verified = [
        candidate
        for candidate in provider_accounts_named(session, provider, public_id)
        if check(candidate.credentials or {})
    ]
    if not verified:
        raise Forged("no provider account of that id signed it", provider=provider)
    return verified


def fresh(timestamp: str | None, settings_max_age: float, now: float | None = None) -> bool:
    """A signed timestamp (unix seconds) inside the replay window, either side of now."""
    try:
        stamp = float(timestamp or "")
    except ValueError:
        return False
    return abs((time.time() if now is None else now) - stamp) <= settings_max_age


def dedupe_key(provider: str, signer: ProviderAccount, *parts: str | None) -> str:
    """The same callback again has the same key: one provider account, one of its message
    ids and one status (or Twilio's idempotency token)."""
    return _dedupe_key(provider, signer.id, *parts)


def _dedupe_key(provider: str, signer_id: int, *parts: str | None) -> str:
    material = "\0".join([provider, str(signer_id), *(part or "" for part in parts)])
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StatusCallback:
    """A status callback as parsed, not yet verified: what a group of callbacks applies
    set-based (`_status_callbacks`). `repeat`: what, beside the signer, makes its dedupe key."""

    provider: str
    sid: str | None
    provider_message_id: str | None
    public_id: str | None
    check: Check
    report: StatusReport
    repeat: tuple[str | None, ...]


def _status_callbacks(session: Session, items: list[StatusCallback]) -> list[object]:
    """A group's status callbacks, set-based: each bound and verified as `bound_to_signer`
    does (the message's own provider account decides), then all applied by
    `apply_status_batch` in a few statements. A forged one answers 403 having changed nothing;
    one naming no message of ours takes the way it takes alone (stored unmatched if a provider
    account of that id signed it)."""
    sids = [
        item.sid or find_sid(session, item.provider, item.provider_message_id) for item in items
    ]
    targets = callback_targets(session, [sid for sid in sids if sid])
    outcomes: list[object] = [None] * len(items)
    moves: list[StatusMove] = []
    moved: list[int] = []
    alone: list[int] = []
    for index, (item, sid) in enumerate(zip(items, sids, strict=True)):
        row = targets.get(sid) if sid else None
        if sid is None or row is None:
            alone.append(index)
            continue
        if (
            row.signer_provider != item.provider
            or row.signer_public_id != item.public_id
            or not item.check(row.signer_credentials or {})
        ):
            outcomes[index] = Forged(
                "not signed by the message's provider account", provider=item.provider
            )
            continue
        key = _dedupe_key(item.provider, row.provider_account_id, *item.repeat)
        moves.append(StatusMove(sid, item.report, key))
        moved.append(index)
    apply_status_batch(session, moves, targets, utcnow())
    for index in alone:
        item = items[index]
        try:
            target = bound_to_signer(
                session, item.provider, sids[index], item.public_id, item.check
            )
        except Forged as refused:
            outcomes[index] = refused
            continue
        _apply(session, target, item.report, dedupe_key(item.provider, target.signer, *item.repeat))
    return outcomes


async def _params(
    request: Request[object, object, State], *, with_query: bool = True
) -> dict[str, str]:
    """A webhook's parameters: query string, form or JSON body, as the provider sent them.

    Twilio signs the URL (query included) plus the POST parameters, so for it the query
    string stays out of the parameters."""
    params = {key: str(value) for key, value in request.query_params.items()} if with_query else {}
    if request.method != "POST":
        return params
    raw = await request.body()
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            body = msgspec.json.decode(raw)
            if isinstance(body, dict):
                params.update({str(key): str(value) for key, value in body.items()})
        else:
            params.update(parse_qsl(raw.decode(), keep_blank_values=True))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise ClientException("missing or invalid parameter body") from None
    return params


def _public_url(settings: Settings, request: Request[object, object, State]) -> str:
    # Providers sign the URL they called: ours as the public base URL says, not as proxied.
    # The path and query as `request.url` has them, read from the scope: building that URL
    # (a split, a join and a split again) was 2.5% of a callback's CPU.
    scope = request.scope
    url = settings.public_base_url.rstrip("/") + scope.get("root_path", "") + scope["path"]
    query = scope.get("query_string", b"").decode()
    return url + ("?" + query if query else "")


def _number(raw: str | None) -> str:
    # Vonage writes numbers without the leading +; everything we store is E.164.
    value = (raw or "").strip()
    return "+" + value if value.isdigit() else value


def _status(statuses: Mapping[str, MessageStatus], word: str | None) -> MessageStatus:
    status = statuses.get((word or "").lower())
    if status is None:
        raise ClientException("missing or invalid parameter status")
    return status


def _error_code(raw: str | None) -> str | None:
    return raw if raw not in (None, "", "0") else None


def _apply(
    session: Session,
    target: Target,
    report: StatusReport,
    key: str,
    *,
    per_part: bool = False,
) -> None:
    sid = target.message.sid if target.message is not None else None
    structlog.contextvars.bind_contextvars(messageSid=sid)
    apply = apply_part_status if per_part else apply_status
    apply(session, sid, report, utcnow(), dedupe_key=key)


@route(
    "/callbacks/twilio",
    http_method=["POST"],
    status_code=204,
    summary="Twilio status callback",
    description=(
        "StatusCallback of messages sent through Twilio. X-Twilio-Signature must verify with "
        "the auth token of the Twilio account that sent the message, named by AccountSid."
    ),
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors=WEBHOOK_ERRORS),
)
async def twilio_status(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    message_sid: MessageSid = None,
    signature: TwilioSignature = None,
    idempotency_token: TwilioIdempotency = None,
) -> None:
    params = await _params(request, with_query=False)
    url = _public_url(callbacks.settings, request)
    status = _status(twilio.TWILIO_STATUSES, params.get("MessageStatus"))
    error_code = _error_code(params.get("ErrorCode"))
    provider_id = params.get("MessageSid")

    def check(credentials: Mapping[str, Any]) -> bool:
        return twilio.verify_webhook(credentials, url, params, signature)

    opted_out = error_code in twilio.OPT_OUT_ERROR_CODES
    report = StatusReport(
        MessageStatus.OPTED_OUT if opted_out else status,
        source="callback",
        provider="twilio",
        provider_status=params.get("MessageStatus"),
        provider_message_id=provider_id,
        error_code=error_code,
        payload=params,
    )
    repeat = (
        (provider_id, params.get("MessageStatus"))
        if provider_id
        else ("idempotency", idempotency_token)
    )

    def apply(session: Session) -> None:
        sid = message_sid or find_sid(session, "twilio", provider_id)
        target = bound_to_signer(session, "twilio", sid, params.get("AccountSid"), check)
        if opted_out and target.message is not None:
            # The recipient replied STOP to this sender: Twilio refuses every later send.
            message = target.message
            add_opt_out(
                session, message.account_id, message.from_number, message.to_number, utcnow()
            )
        _apply(session, target, report, dedupe_key("twilio", target.signer, *repeat))

    if opted_out:
        await callbacks.apply(apply, message_sid=message_sid)  # an opt-out: alone
        return
    item = StatusCallback(
        "twilio", message_sid, provider_id, params.get("AccountSid"), check, report, repeat
    )
    await callbacks.apply(apply, message_sid=message_sid, batch=_status_callbacks, item=item)


def _vonage_check(params: Mapping[str, str], token: str | None, max_age: float) -> Check:
    """A Vonage webhook is genuine when its `sig` verifies with the account's signature
    secret inside the replay window, or, unsigned, when it came to a URL carrying one of the
    account's callback tokens (how most real Vonage accounts deliver receipts)."""

    def check(credentials: Mapping[str, Any]) -> bool:
        if params.get("sig"):
            return vonage.verify_webhook(credentials, params) and fresh(
                params.get("timestamp"), max_age
            )
        return token is not None and any(
            _same(token, issued) for issued in callback_tokens(dict(credentials))
        )

    return check


def _same(given: str, issued: str) -> bool:
    return hmac.compare_digest(given.encode(), issued.encode())


async def _vonage_receipt(
    request: Request[object, object, State],
    callbacks: CallbackGroups,
    message_sid: str | None,
    token: str | None,
) -> None:
    params = await _params(request)
    params.pop("messageSid", None)  # ours, added to the URL; not part of what Vonage signed
    status = _status(vonage.VONAGE_STATUSES, params.get("status"))
    check = _vonage_check(params, token, callbacks.settings.webhook_max_age.total_seconds())
    part_id = params.get("messageId")

    def apply(session: Session) -> None:
        sid = message_sid or params.get("client-ref") or find_sid(session, "vonage", part_id)
        target = bound_to_signer(session, "vonage", sid, params.get("api-key"), check)
        report = StatusReport(
            status,
            source="callback",
            provider="vonage",
            provider_status=params.get("status"),
            provider_message_id=part_id,
            error_code=_error_code(params.get("err-code")),
            payload={key: value for key, value in params.items() if key != "sig"},
        )
        key = dedupe_key("vonage", target.signer, part_id, params.get("status"))
        # Each SMS part of a long text has its own id and its own receipt.
        _apply(session, target, report, key, per_part=True)

    await callbacks.apply(apply, message_sid=message_sid or params.get("client-ref"))


VONAGE_RECEIPT = (
    "Delivery receipts (DLR) of messages sent through Vonage, as GET query, POST form or POST "
    "JSON. Genuine when `sig` verifies with the signature secret of the account named by "
    "`api-key` (any of Vonage's signing methods) and `timestamp` is recent"
)


@route(
    "/callbacks/vonage",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage delivery receipt (signed)",
    description=VONAGE_RECEIPT + ".",
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors=WEBHOOK_ERRORS),
)
async def vonage_receipt(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    message_sid: MessageSid = None,
) -> None:
    await _vonage_receipt(request, callbacks, message_sid, None)


@route(
    "/callbacks/vonage/{token:str}",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage delivery receipt (URL secret)",
    description=(
        VONAGE_RECEIPT + ", or, unsigned, when the path carries the callback token of that "
        "account (`sms-dispatch provider set` prints the URL; `provider rotate-callback-token` "
        "issues a new one)."
    ),
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors=WEBHOOK_ERRORS),
)
async def vonage_receipt_with_token(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    token: CallbackToken,
    message_sid: MessageSid = None,
) -> None:
    await _vonage_receipt(request, callbacks, message_sid, token)


@route(
    "/callbacks/simulator",
    http_method=["POST"],
    summary="Simulator status callback",
    description=(
        "Delivery reports from the simulator provider, signed with the signing secret of the "
        "simulator account named by `accountId` over timestamp, URL and body."
    ),
    tags=["Provider callbacks"],
    status_code=204,
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(
        body=json_object(
            ["id", "status", "accountId"],
            id=string("The simulator's message id", "SIM0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
            status=string("queued, sending, sent, delivered, undelivered or failed", "delivered"),
            accountId=string("The simulator account that sent it", "SA" + "0" * 32),
            errorCode=string("The provider's error code, for failures"),
        ),
        errors=WEBHOOK_ERRORS,
    ),
)
async def simulator_callback(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    message_sid: MessageSid = None,
    signature: Annotated[
        str | None,
        HeaderParameter(
            name=simulator.SIGNATURE_HEADER,
            description="Hex HMAC-SHA256 over timestamp, public URL and body",
        ),
    ] = None,
    timestamp: Annotated[
        str | None,
        HeaderParameter(name=simulator.TIMESTAMP_HEADER, description="Unix seconds, signed"),
    ] = None,
) -> None:
    raw = await request.body()
    url = _public_url(callbacks.settings, request)
    max_age = callbacks.settings.webhook_max_age.total_seconds()
    try:
        payload = msgspec.json.decode(raw, type=dict[str, object])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise ClientException("missing or invalid parameter status") from None
    status = _status(simulator.SIMULATOR_STATUSES, str(payload.get("status", "")))
    provider_id = str(payload.get("id") or "") or None

    def check(credentials: Mapping[str, Any]) -> bool:
        secret = credentials.get("signing_secret")
        return (
            bool(secret)
            and simulator.verify_signature(str(secret), timestamp or "", url, raw, signature)
            and fresh(timestamp, max_age)
        )

    report = StatusReport(
        status,
        source="callback",
        provider="simulator",
        provider_status=str(payload["status"]),
        provider_message_id=provider_id,
        error_code=str(payload["errorCode"]) if payload.get("errorCode") else None,
        payload=payload,
    )
    account = str(payload.get("accountId") or "") or None

    def apply(session: Session) -> None:
        sid = message_sid or find_sid(session, "simulator", provider_id)
        target = bound_to_signer(session, "simulator", sid, account, check)
        key = dedupe_key("simulator", target.signer, provider_id, str(payload["status"]))
        _apply(session, target, report, key)

    item = StatusCallback(
        "simulator",
        message_sid,
        provider_id,
        account,
        check,
        report,
        (provider_id, str(payload["status"])),
    )
    await callbacks.apply(apply, message_sid=message_sid, batch=_status_callbacks, item=item)


@route(
    "/inbound/twilio",
    http_method=["POST"],
    summary="Twilio inbound SMS",
    description=(
        "STOP-family keywords opt the sender out of our number; START/UNSTOP opt back in. "
        "Applied for every account holding settings of the signing Twilio account."
    ),
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors={400: BAD_BODY, 403: FORBIDDEN, 413: TOO_LARGE}),
    media_type="text/xml",
)
async def twilio_inbound(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    signature: TwilioSignature = None,
) -> Response[str]:
    params = await _params(request, with_query=False)
    url = _public_url(callbacks.settings, request)

    def check(credentials: Mapping[str, Any]) -> bool:
        return twilio.verify_webhook(credentials, url, params, signature)

    await _inbound(
        callbacks,
        "twilio",
        params.get("AccountSid"),
        check,
        sender=params.get("To"),
        recipient=params.get("From"),
        text=params.get("Body", ""),
    )
    # An empty TwiML answer: we reply nothing (Twilio itself answers STOP on its numbers).
    return Response(EMPTY_TWIML, media_type="text/xml")


async def _vonage_inbound(
    request: Request[object, object, State],
    callbacks: CallbackGroups,
    token: str | None,
) -> None:
    params = await _params(request)
    check = _vonage_check(params, token, callbacks.settings.webhook_max_age.total_seconds())

    await _inbound(
        callbacks,
        "vonage",
        params.get("api-key"),
        check,
        sender=params.get("to"),
        recipient=params.get("msisdn"),
        text=params.get("text", ""),
    )


async def _inbound(
    callbacks: CallbackGroups,
    provider: str,
    public_id: str | None,
    check: Check,
    *,
    sender: str | None,
    recipient: str | None,
    text: str,
) -> None:
    """An inbound SMS (STOP / START) for every account holding settings of the signing
    provider account: each of them proved it holds that account's secret."""

    def apply(session: Session) -> None:
        for signer in signers(session, provider, public_id, check):
            handle_inbound(
                session,
                signer.account_id,
                sender=_number(sender),
                recipient=_number(recipient),
                text=text,
                now=utcnow(),
            )

    await callbacks.apply(apply)


@route(
    "/inbound/vonage",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage inbound SMS (signed)",
    description="STOP-family keywords opt the sender out of our number; START/UNSTOP opt back in.",
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors={400: BAD_BODY, 403: FORBIDDEN, 413: TOO_LARGE}),
)
async def vonage_inbound(request: Request[object, object, State], callbacks: CallbacksDep) -> None:
    await _vonage_inbound(request, callbacks, None)


@route(
    "/inbound/vonage/{token:str}",
    http_method=["GET", "POST"],
    status_code=204,
    summary="Vonage inbound SMS (URL secret)",
    description="As the signed route; unsigned messages are taken when the path carries the "
    "account's callback token.",
    tags=["Provider callbacks"],
    request_max_body_size=MAX_BODY_BYTES,
    operation_class=documented(errors={400: BAD_BODY, 403: FORBIDDEN, 413: TOO_LARGE}),
)
async def vonage_inbound_with_token(
    request: Request[object, object, State],
    callbacks: CallbacksDep,
    token: CallbackToken,
) -> None:
    await _vonage_inbound(request, callbacks, token)


WEBHOOKS = [
    twilio_status,
    vonage_receipt,
    vonage_receipt_with_token,
    simulator_callback,
    twilio_inbound,
    vonage_inbound,
    vonage_inbound_with_token,
]
