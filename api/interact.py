"""The Interact REST endpoints: Send SMS (v3 and v2), Notify SMS, Get Interaction Link and
generateToken."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec
import structlog
from litestar import MediaType, Request, Response, post
from litestar.datastructures import State
from litestar.params import FromPath
from sqlalchemy.orm import Session

from api.body import JsonBody
from api.dependencies import AcceptDep, SettingsDep, TransactionsDep
from api.headers import (
    MAX_IDEMPOTENCY_KEY,
    V2,
    V3,
    ApplicationKey,
    EnvironmentName,
    IdempotencyKey,
    TenantId,
)
from api.openapi import (
    BAD_PARAMETER,
    GENERATE_TOKEN_BODY,
    LINK_BODY,
    NOT_FOUND,
    NOTIFY_BODY,
    PLACED,
    SEND_ERRORS,
    SEND_SMS_BODY,
    SEND_SMS_V2_BODY,
    TOKEN_EXPIRED,
    UNAUTHORIZED,
    UNEXPECTED,
    documented,
    text,
)
from shared.accounts.access import authenticate, resolve_environment
from shared.calls.tokens import IssuedToken, issue_token
from shared.core.errors import InvalidParameter
from shared.core.models import utcnow
from shared.messages.accept import AcceptedMessage, SendSmsCommand, notify_external_send
from shared.messages.accept import get_interaction_link as interaction_link_for
from shared.messages.group_commit import GroupAccept
from shared.text.phone import to_e164

log = structlog.get_logger(__name__)


class SendSmsJson(msgspec.Struct):
    messageSid: str  # noqa: N815 - the API's own spelling
    message: str


class TokenJson(msgspec.Struct):
    jpToken: str  # noqa: N815
    callerId: str  # noqa: N815
    issuedAt: datetime  # noqa: N815
    expiresAt: datetime  # noqa: N815


def wants_json(request: Request[Any, Any, Any]) -> bool:
    """Whether the caller asked for the JSON answer. Decided before the message is accepted: an
    Accept header that cannot be read gets the seed's text, never a 500 for a message that
    was committed (a caller without an Idempotency-Key would send it again)."""
    accept = request.headers.get("accept")
    # Most IVRs send no Accept (or */*): text, without parsing the header's media ranges.
    if accept in (None, "*/*"):
        return False
    try:
        return request.accept.best_match([MediaType.TEXT, MediaType.JSON]) == MediaType.JSON
    except (ValueError, ArithmeticError):
        # A quality such as q=inf or q=1e999 makes the parser's arithmetic fail.
        log.info("request.unreadable_accept", accept=accept)
        return False


def placed_response(accepted: AcceptedMessage, *, as_json: bool) -> Response[object]:
    """The seed's success text, or the same as JSON for callers that ask for JSON."""
    text = f"Placed campaign {{{accepted.campaign_id}}} in SMS queue messageSid: {accepted.sid}"
    headers = {"Idempotency-Replay": "true"} if accepted.replayed else None
    if as_json:
        return Response(
            SendSmsJson(messageSid=accepted.sid, message=text),
            status_code=200,
            media_type=MediaType.JSON,
            headers=headers,
        )
    return Response(text, status_code=200, media_type=MediaType.TEXT, headers=headers)


def send_command(
    body: JsonBody,
    account_id: str,
    campaign_id: str,
    tenant_id: str | None,
    application_key: str | None,
    environment_name: str | None,
    *,
    region: str,
    path_caller_id: str | None = None,
    idempotency_key: str | None = None,
    version: int = 3,
    schedulable: bool = True,
) -> SendSmsCommand:
    """A REST body and headers as the accept service's command; nothing is judged yet.
    `schedulable`: whether the body's sendAt means anything (not for Notify SMS, which records
    a text the caller's own gateway already sent)."""
    caller_id = body.text("callerId", allow_number=True)
    invalid = body.invalid
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        invalid = invalid or "Idempotency-Key"
    # Two different numbers for one message: refuse, never guess.
    if (
        path_caller_id
        and caller_id
        and to_e164(path_caller_id, region) != to_e164(caller_id, region)
    ):
        invalid = invalid or "callerId"
    return SendSmsCommand(
        account_in_url=account_id,
        tenant_id=tenant_id,
        application_key=application_key,
        environment_name=environment_name,
        campaign_id=campaign_id,
        caller_id=caller_id or path_caller_id,
        sender=body.text("from", allow_number=True),
        # Version 2 has no jpToken: one in its body is ignored, not an error.
        jp_token=body.text("jpToken") if version >= 3 else None,
        additional_params=body.text("additionalParams"),
        send_at=body.timestamp("sendAt") if schedulable else None,
        # Notify SMS records a text someone else sent: there is no status of ours to report.
        status_callback=body.text("statusCallback") if schedulable else None,
        invalid_parameter=invalid or body.invalid,
        require_token=version >= 3,
        idempotency_key=idempotency_key,
    )


async def _send(
    request: Request[object, object, State],
    accept: GroupAccept,
    account_id: str,
    campaign_id: str,
    path_caller_id: str | None,
    tenant_id: str | None,
    application_key: str | None,
    environment_name: str | None,
    idempotency_key: str | None,
    version: int = 3,
) -> Response[object]:
    as_json = wants_json(request)
    command = send_command(
        JsonBody(await request.body()),
        account_id,
        campaign_id,
        tenant_id,
        application_key,
        environment_name,
        region=accept.settings.default_region,
        path_caller_id=path_caller_id,
        idempotency_key=idempotency_key,
        version=version,
    )
    return placed_response(await accept.send(command), as_json=as_json)


@post(
    f"{V3}/campaign/sms/{{campaign_id:str}}",
    summary="Send SMS (version 3)",
    description=(
        "Queues the campaign's SMS to the caller and answers with its messageSid. "
        "The message is committed before the answer and sent by a worker shortly after; "
        "the call's `smsSent` becomes true in the Deflected Call Report once a provider took it."
    ),
    tags=["Send SMS"],
    operation_class=documented(body=SEND_SMS_BODY, success=PLACED, errors=SEND_ERRORS),
    status_code=200,
)
async def send_sms(
    request: Request[object, object, State],
    accept: AcceptDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[object]:
    return await _send(
        request,
        accept,
        account_id,
        campaign_id,
        None,
        tenant_id,
        application_key,
        environment_name,
        idempotency_key,
    )


@post(
    f"{V3}/campaign/sms/{{campaign_id:str}}/callerid/{{caller_id:str}}",
    summary="Send SMS (version 3), caller in the path",
    description="The seed's sample form: the same as Send SMS with `callerId` taken from the path.",
    tags=["Send SMS"],
    operation_class=documented(body=SEND_SMS_BODY, success=PLACED, errors=SEND_ERRORS),
    status_code=200,
)
async def send_sms_to_caller(
    request: Request[object, object, State],
    accept: AcceptDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    caller_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[object]:
    return await _send(
        request,
        accept,
        account_id,
        campaign_id,
        caller_id,
        tenant_id,
        application_key,
        environment_name,
        idempotency_key,
    )


@post(
    f"{V3}/token",
    summary="generateToken",
    description=(
        "Issues the per-call `jpToken` (7 letters and digits) that Send SMS v3 requires, and opens "
        "the call's row in the Deflected Call Report. Tokens expire; a send with an expired one "
        "answers 403 `Token expired`."
    ),
    tags=["Interaction tokens"],
    operation_class=documented(
        body=GENERATE_TOKEN_BODY,
        errors={400: BAD_PARAMETER, 401: UNAUTHORIZED, 500: UNEXPECTED},
    ),
    status_code=200,
)
async def generate_token(
    request: Request[object, object, State],
    transactions: TransactionsDep,
    settings: SettingsDep,
    account_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
) -> TokenJson:
    body = JsonBody(await request.body())
    caller_id = body.text("callerId", allow_number=True)
    lifetime_seconds = body.integer("lifetimeSeconds")

    def issue(session: Session) -> IssuedToken:
        account = authenticate(session, account_id, tenant_id, application_key)
        if body.invalid:
            raise InvalidParameter(body.invalid)
        environment = resolve_environment(session, account, environment_name)
        caller = to_e164(caller_id, settings.default_region) if caller_id else None
        if caller is None:
            raise InvalidParameter("callerId")
        lifetime = settings.token_lifetime
        if lifetime_seconds is not None:
            # Checked as a number first: an absurd value must not overflow timedelta.
            if not 0 < lifetime_seconds <= settings.token_max_lifetime.total_seconds():
                raise InvalidParameter("lifetimeSeconds")
            lifetime = timedelta(seconds=lifetime_seconds)
        return issue_token(session, account, environment, caller, lifetime, utcnow())

    issued = await transactions.run(issue)
    return TokenJson(
        jpToken=issued.token,
        callerId=issued.caller,
        issuedAt=issued.issued_at,
        expiresAt=issued.expires_at,
    )


@post(
    f"{V2}/campaign/sms/{{campaign_id:str}}",
    summary="Send SMS (version 2)",
    description=(
        "As version 3 without `jpToken`: the SMS is queued and tracked, but no call's "
        "Deflected Call Report row is touched."
    ),
    tags=["Send SMS"],
    operation_class=documented(body=SEND_SMS_V2_BODY, success=PLACED, errors=SEND_ERRORS),
    status_code=200,
)
async def send_sms_v2(
    request: Request[object, object, State],
    accept: AcceptDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[object]:
    return await _send(
        request,
        accept,
        account_id,
        campaign_id,
        None,
        tenant_id,
        application_key,
        environment_name,
        idempotency_key,
        version=2,
    )


@post(
    f"{V3}/campaign/sms/notify/{{campaign_id:str}}",
    summary="Notify SMS",
    description=(
        "Sends nothing: records that the caller's own gateway sent the campaign's SMS for the "
        "call, so the call's `smsSent` is true (`smsSentBy: external`) in the report."
    ),
    tags=["Send SMS"],
    operation_class=documented(
        body=NOTIFY_BODY,
        success=text(
            "The call is recorded as sent by an external gateway",
            "Recorded campaign {campaign1} SMS as sent for jpToken: Aejhib7",
        ),
        errors={
            400: BAD_PARAMETER,
            401: UNAUTHORIZED,
            403: TOKEN_EXPIRED,
            404: NOT_FOUND,
            500: UNEXPECTED,
        },
    ),
    status_code=200,
    media_type=MediaType.TEXT,
)
async def notify_sms(
    request: Request[object, object, State],
    transactions: TransactionsDep,
    settings: SettingsDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
) -> str:
    command = send_command(
        JsonBody(await request.body()),
        account_id,
        campaign_id,
        tenant_id,
        application_key,
        environment_name,
        region=settings.default_region,
        schedulable=False,
    )
    token = await transactions.run(
        lambda session: notify_external_send(session, command, settings, utcnow())
    )
    return f"Recorded campaign {{{campaign_id}}} SMS as sent for jpToken: {token}"


@post(
    f"{V2}/campaign/url/{{campaign_id:str}}",
    summary="Get Interaction Link",
    description=(
        "The campaign's link (with `additionalParams`) as text, for callers that send the SMS "
        "through their own gateway. With `shortenUrl: true`, a short link served by this "
        "service (`/l/<code>`) that redirects to it."
    ),
    tags=["Links"],
    operation_class=documented(
        body=LINK_BODY,
        success=text("The link (or a short link)", "https://flows.example.com/start?var1=value1"),
        errors={
            400: BAD_PARAMETER,
            401: UNAUTHORIZED,
            403: TOKEN_EXPIRED,
            404: NOT_FOUND,
            500: UNEXPECTED,
        },
    ),
    status_code=200,
    media_type=MediaType.TEXT,
)
async def get_interaction_link(
    request: Request[object, object, State],
    transactions: TransactionsDep,
    settings: SettingsDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
) -> str:
    body = JsonBody(await request.body())
    shorten_it = body.flag("shortenUrl")
    command = SendSmsCommand(
        account_in_url=account_id,
        tenant_id=tenant_id,
        application_key=application_key,
        environment_name=environment_name,
        campaign_id=campaign_id,
        caller_id=None,
        additional_params=body.text("additionalParams"),
        invalid_parameter=body.invalid,
    )
    return await transactions.run(
        lambda session: interaction_link_for(session, command, shorten_it, settings, utcnow())
    )
