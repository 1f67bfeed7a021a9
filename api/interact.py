"""The Interact REST endpoints: Send SMS v3 and generateToken."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import anyio.to_thread
import msgspec
from litestar import MediaType, Request, Response, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter

from api.body import JsonBody
from api.openapi import GENERATE_TOKEN_BODY, SEND_SMS_BODY, operation_with_body
from api.placement import Placement
from shared.accept import AcceptedMessage, SendSmsCommand
from shared.accounts import authenticate, resolve_environment
from shared.errors import InvalidParameter
from shared.models import utcnow
from shared.phone import to_e164
from shared.tokens import IssuedToken, issue_token

V3 = "/interact/version/3/account/{account_id:str}/resources"

TenantId = Annotated[str | None, HeaderParameter(name="Tenant-Id", description="The account")]
ApplicationKey = Annotated[
    str | None,
    HeaderParameter(name="Application-Key", description="Public API Service application key"),
]
EnvironmentName = Annotated[
    str | None,
    HeaderParameter(
        name="Environment-Name", description="Environment; the account's default if absent"
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description=(
            "Optional (at most 255 characters): a retried request with the same key "
            "gets the first answer again"
        ),
    ),
]

MAX_IDEMPOTENCY_KEY = 255  # the column's width

SEND_RESPONSES = {
    400: ResponseSpec(
        str, description="missing or invalid parameter <parameter>", media_type=MediaType.TEXT
    ),
    401: ResponseSpec(
        dict[str, str],
        description="Missing or wrong credentials; the Unauthenticated-Reason header says which",
    ),
    403: ResponseSpec(
        str,
        description="Token expired (token, or campaign inactive/outdated)",
        media_type=MediaType.TEXT,
    ),
    404: ResponseSpec(
        str, description="Campaign <campaign id> was not found", media_type=MediaType.TEXT
    ),
    422: ResponseSpec(
        str,
        description="Idempotency-Key reused with a different request",
        media_type=MediaType.TEXT,
    ),
    500: ResponseSpec(
        str,
        description="Telephony provider not defined or expired; or `exception`",
        media_type=MediaType.TEXT,
    ),
}


class SendSmsJson(msgspec.Struct):
    messageSid: str  # noqa: N815 - the API's own spelling
    message: str


class TokenJson(msgspec.Struct):
    jpToken: str  # noqa: N815
    callerId: str  # noqa: N815
    issuedAt: datetime  # noqa: N815
    expiresAt: datetime  # noqa: N815


def placed_response(
    request: Request[object, object, State], accepted: AcceptedMessage
) -> Response[object]:
    """The seed's success text, or the same as JSON for callers that ask for JSON."""
    text = f"Placed campaign {{{accepted.campaign_id}}} in SMS queue messageSid: {accepted.sid}"
    headers = {"Idempotency-Replay": "true"} if accepted.replayed else None
    if request.accept.best_match([MediaType.TEXT, MediaType.JSON]) == MediaType.JSON:
        return Response(
            SendSmsJson(messageSid=accepted.sid, message=text),
            status_code=200,
            media_type=MediaType.JSON,
            headers=headers,
        )
    return Response(text, status_code=200, media_type=MediaType.TEXT, headers=headers)


async def _send(
    request: Request[object, object, State],
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    path_caller_id: str | None,
    tenant_id: str | None,
    application_key: str | None,
    environment_name: str | None,
    idempotency_key: str | None,
) -> Response[object]:
    placement: Placement = request.app.state.placement
    region = placement.settings.default_region
    body = JsonBody(await request.body())
    caller_id = body.text("callerId", allow_number=True)
    invalid = body.invalid
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        invalid = invalid or "Idempotency-Key"
    if (
        path_caller_id
        and caller_id
        and to_e164(path_caller_id, region) != to_e164(caller_id, region)
    ):
        invalid = (
            invalid or "callerId"
        )  # two different numbers for one message: refuse, never guess
    command = SendSmsCommand(
        account_in_url=account_id,
        tenant_id=tenant_id,
        application_key=application_key,
        environment_name=environment_name,
        campaign_id=campaign_id,
        caller_id=caller_id or path_caller_id,
        sender=body.text("from", allow_number=True),
        jp_token=body.text("jpToken"),
        additional_params=body.text("additionalParams"),
        invalid_parameter=invalid or body.invalid,
        idempotency_key=idempotency_key,
    )
    accepted = await anyio.to_thread.run_sync(placement.place, command)
    return placed_response(request, accepted)


@post(
    f"{V3}/campaign/sms/{{campaign_id:str}}",
    summary="Send SMS (version 3)",
    description=(
        "Queues the campaign's SMS to the caller and answers with its messageSid. "
        "The message is committed before the answer and sent by a worker shortly after; "
        "the call's `smsSent` becomes true in the Deflected Call Report once a provider took it."
    ),
    tags=["Send SMS"],
    operation_class=operation_with_body(SEND_SMS_BODY),
    responses=SEND_RESPONSES,
    status_code=200,
)
async def send_sms(
    request: Request[object, object, State],
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[object]:
    return await _send(
        request,
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
    operation_class=operation_with_body(SEND_SMS_BODY),
    responses=SEND_RESPONSES,
    status_code=200,
)
async def send_sms_to_caller(
    request: Request[object, object, State],
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
    operation_class=operation_with_body(GENERATE_TOKEN_BODY),
    responses={k: v for k, v in SEND_RESPONSES.items() if k in (400, 401, 500)},
    status_code=200,
)
async def generate_token(
    request: Request[object, object, State],
    account_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
) -> TokenJson:
    body = JsonBody(await request.body())
    caller_id = body.text("callerId", allow_number=True)
    lifetime_seconds = body.integer("lifetimeSeconds")
    placement: Placement = request.app.state.placement
    settings = placement.settings

    def issue() -> IssuedToken:
        with placement.db.transaction() as session:
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

    issued = await anyio.to_thread.run_sync(issue)
    return TokenJson(
        jpToken=issued.token,
        callerId=issued.caller,
        issuedAt=issued.issued_at,
        expiresAt=issued.expires_at,
    )
