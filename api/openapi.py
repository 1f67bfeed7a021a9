"""OpenAPI for handlers that read their own body (so that 401 is checked before 400) and whose
answers are fixed texts: the documented responses are written out here, with the seed's words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
)

from shared.core.errors import (
    MORE_INFO_URL,
    PROVIDER_NOT_DEFINED,
    UNAUTHORIZED_CODE,
    UNAUTHORIZED_MESSAGE,
)

STRING = Schema(type=OpenAPIType.STRING)
SID_EXAMPLE = "SM3ae49ea884e3494e903b13b2681aba3e"


def json_object(required: list[str], **properties: Schema) -> Schema:
    return Schema(type=OpenAPIType.OBJECT, properties=dict(properties), required=required or None)


def string(description: str, example: Any = None) -> Schema:
    return Schema(
        type=OpenAPIType.STRING, description=description, examples=[example] if example else None
    )


def integer(description: str) -> Schema:
    return Schema(type=OpenAPIType.INTEGER, description=description)


def text(description: str, example: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={"text/plain": OpenAPIMediaType(schema=STRING, example=example)},
    )


UNAUTHORIZED = OpenAPIResponse(
    description="Missing or wrong credentials (also a Tenant-Id that is not the URL's account)",
    headers={
        "Unauthenticated-Reason": OpenAPIHeader(
            schema=STRING,
            description="Why: a missing header, a Tenant-Id not matching the URL, a wrong key",
        )
    },
    content={
        "application/json": OpenAPIMediaType(
            schema=json_object(
                ["code", "message", "moreInfoUrl"],
                code=STRING,
                message=STRING,
                moreInfoUrl=STRING,
            ),
            example={
                "code": UNAUTHORIZED_CODE,
                "message": UNAUTHORIZED_MESSAGE,
                "moreInfoUrl": MORE_INFO_URL,
            },
        )
    },
)
BAD_PARAMETER = text("A missing or unusable field, named", "missing or invalid parameter callerId")
TOKEN_EXPIRED = text("The token expired, or the campaign is inactive or outdated", "Token expired")
NOT_FOUND = text("No such campaign in the environment", "Campaign campaign1 was not found")
FAILED = text(
    "Telephony provider settings missing or expired; `exception` for anything unexpected",
    PROVIDER_NOT_DEFINED,
)
UNEXPECTED = text("Anything unexpected (logged, never shown)", "exception")
IDEMPOTENCY_CONFLICT = text(
    "Idempotency-Key reused with a different request",
    "Idempotency-Key was already used with a different request",
)

UNAVAILABLE = text(
    "The database is unreachable: nothing was accepted, retry later", "service unavailable"
)

SEND_ERRORS = {
    400: BAD_PARAMETER,
    401: UNAUTHORIZED,
    403: TOKEN_EXPIRED,
    404: NOT_FOUND,
    422: IDEMPOTENCY_CONFLICT,
    500: FAILED,
    503: UNAVAILABLE,
}
PLACED = OpenAPIResponse(
    description="Recorded (committed) and queued; sent by a worker shortly after",
    content={
        "text/plain": OpenAPIMediaType(
            schema=STRING,
            example=f"Placed campaign {{campaign1}} in SMS queue messageSid: {SID_EXAMPLE}",
        ),
        "application/json": OpenAPIMediaType(
            schema=json_object(["messageSid", "message"], messageSid=STRING, message=STRING),
            example={
                "messageSid": SID_EXAMPLE,
                "message": f"Placed campaign {{campaign1}} in SMS queue messageSid: {SID_EXAMPLE}",
            },
        ),
    },
    headers={
        "Idempotency-Replay": OpenAPIHeader(
            schema=STRING, description="`true` when an Idempotency-Key replayed an earlier answer"
        )
    },
)
AUTH_HEADERS = ("Tenant-Id", "Application-Key")
TOO_MANY_FAILURES = OpenAPIResponse(
    description=(
        "Too many missing or wrong credentials from this client address lately (SMSD_AUTH_*): "
        "every request from it is refused for a while, with the right key too"
    ),
    headers={"Retry-After": OpenAPIHeader(schema=STRING, description="Seconds to wait")},
    content={
        "text/plain": OpenAPIMediaType(
            schema=STRING,
            example="Too many requests with missing or wrong credentials from this address; "
            "retry after 300 seconds",
        )
    },
)
BODY_TOO_LARGE = text(
    "A body over the route's limit (SMSD_MAX_BODY_BYTES), refused while it is read",
    "request body too large: at most 65536 bytes",
)


def xml(description: str, example: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={"text/xml": OpenAPIMediaType(schema=STRING, example=example)},
    )


def documented(
    *,
    errors: dict[int, OpenAPIResponse],
    body: Schema | None = None,
    success: OpenAPIResponse | None = None,
    success_status: int = 200,
    bodies: dict[str, OpenAPIMediaType] | None = None,
) -> type[Operation]:
    """An Operation class that documents these exact answers (and `body` as the JSON body, or
    `bodies` by media type)."""
    content = bodies or ({"application/json": OpenAPIMediaType(schema=body)} if body else None)

    @dataclass
    class _Documented(Operation):
        def __post_init__(self) -> None:
            if content is not None:
                self.request_body = RequestBody(content=content, required=False)
            # Litestar's generic validation 400 is never what we answer: ours replace it.
            responses = {
                code: response
                for code, response in (self.responses or {}).items()
                if not code.startswith(("4", "5"))
            }
            if success is not None:
                responses[str(success_status)] = success
            implied: dict[int, OpenAPIResponse] = {}
            if 401 in errors:
                # Whoever can fail authentication can be throttled for failing it too often,
                # and every authenticated answer needs the database.
                implied[429] = TOO_MANY_FAILURES
                implied[503] = UNAVAILABLE
            if content is not None:
                implied[413] = BODY_TOO_LARGE
            responses.update({str(code): response for code, response in (implied | errors).items()})
            self.responses = responses
            for parameter in self.parameters or []:
                # Optional to the framework so that their absence is our 401, not its 400.
                if isinstance(parameter, Parameter) and parameter.name in AUTH_HEADERS:
                    parameter.required = True

    return _Documented


SEND_AT = string(
    "When to send it (optional; RFC 3339 with an offset, at most SMSD_SCHEDULE_HORIZON ahead; "
    "a time past: at once). Its validity counts from then.",
    "2026-12-24T09:00:00+01:00",
)

STATUS_CALLBACK = string(
    "Where to POST each status change of the message as JSON (optional; http or https, signed "
    "with the account's webhook secret in Smsd-Signature; see the README's status callbacks). "
    "Absent: the campaign's, if it has one. A private, loopback or link-local address is "
    "refused unless the operator allows its network.",
    "https://example.com/sms/status",
)

SEND_SMS_BODY = json_object(
    [],
    **{
        "from": string(
            "Sender number or id; one of the account's senders (optional)", "+12121234567"
        ),
        "callerId": string(
            "Customer phone number; any format phonenumbers reads", "+972 54 4696388"
        ),
        "jpToken": string("Token from generateToken (required for version 3)", "Aejhib7"),
        "additionalParams": string(
            "Query string appended to the campaign link", "var1=value1&var2=value"
        ),
        "sendAt": SEND_AT,
        "statusCallback": STATUS_CALLBACK,
    },
)

GENERATE_TOKEN_BODY = json_object(
    ["callerId"],
    callerId=string("The caller's phone number", "+972 54 4696388"),
    lifetimeSeconds=integer("How long the token is valid (default: the service's setting)"),
)

SEND_SMS_V2_BODY = json_object(
    [],
    **{
        "from": string(
            "Sender number or id; one of the account's senders (optional)", "+12121234567"
        ),
        "callerId": string("Customer phone number", "+972 54 4696388"),
        "additionalParams": string("Query string appended to the campaign link", "var1=value1"),
        "sendAt": SEND_AT,
        "statusCallback": STATUS_CALLBACK,
    },
)

NOTIFY_BODY = json_object(
    ["callerId", "jpToken"],
    callerId=string("Customer phone number", "+972 54 4696388"),
    jpToken=string("The call's token from generateToken", "Aejhib7"),
)

LINK_BODY = json_object(
    [],
    additionalParams=string("Query string appended to the campaign link", "var1=value1"),
    shortenUrl=Schema(type=OpenAPIType.BOOLEAN, description="Answer a short link (default false)"),
)


BULK_ROW = json_object(
    ["callerId"],
    **{
        "callerId": Schema(
            one_of=[STRING, Schema(type=OpenAPIType.INTEGER)],
            description="Recipient phone number (a JSON number is read as its digits)",
            examples=["+972 54 4696388"],
        ),
        "additionalParams": string("Query string appended to the campaign link", "var1=value1"),
        "jpToken": string("A call's token from generateToken (optional)", "Aejhib7"),
        "from": string("Sender; one of the account's senders (optional)", "+12121234567"),
    },
)
BULK_BODIES = {
    "application/json": OpenAPIMediaType(
        schema=Schema(type=OpenAPIType.ARRAY, items=BULK_ROW),
        example=[
            {"callerId": "+972544696388", "additionalParams": "var1=a"},
            {"callerId": "+972544696389", "jpToken": "Aejhib7"},
        ],
    ),
    "text/csv": OpenAPIMediaType(
        schema=STRING,
        example="callerId,additionalParams\n+972544696388,var1=a\n+972544696389,var1=b\n",
    ),
}
BATCH_EXAMPLE = "BB0c4d6e3b2a1f49e8a7b6c5d4e3f2a1b0"
BULK_ACCEPTED = OpenAPIResponse(
    description=(
        "The valid rows are committed as messages and queued; `rejected` lists the others "
        "(row number from 1, the parameter, Send SMS's error text)"
    ),
    headers={
        "Location": OpenAPIHeader(schema=STRING, description="The batch's progress"),
        "Idempotency-Replay": OpenAPIHeader(
            schema=STRING, description="`true` when an Idempotency-Key replayed an earlier answer"
        ),
    },
    content={
        "application/json": OpenAPIMediaType(
            schema=json_object(
                ["batchId", "campaignId", "accepted", "rejected"],
                batchId=STRING,
                campaignId=STRING,
                accepted=integer("Messages stored and queued"),
                rejected=Schema(
                    type=OpenAPIType.ARRAY,
                    items=json_object(
                        ["row", "parameter", "error"],
                        row=integer("The row's number, from 1 (a CSV header is not counted)"),
                        parameter=STRING,
                        error=STRING,
                    ),
                ),
            ),
            example={
                "batchId": BATCH_EXAMPLE,
                "campaignId": "campaign1",
                "accepted": 1,
                "rejected": [
                    {
                        "row": 2,
                        "parameter": "callerId",
                        "error": "missing or invalid parameter callerId",
                    }
                ],
            },
        )
    },
)
BULK_PROGRESS = OpenAPIResponse(
    description="The batch's messages counted by where they are",
    content={
        "application/json": OpenAPIMediaType(
            schema=json_object(
                [],
                batchId=STRING,
                campaignId=STRING,
                createdAt=STRING,
                cancelledAt=Schema(
                    one_of=[STRING, Schema(type=OpenAPIType.NULL)],
                    description="When the batch was cancelled; null if it was not",
                ),
                accepted=integer("Messages stored"),
                rejected=integer("Rows refused"),
                queued=integer("Not sent yet"),
                sent=integer("Taken by a provider, no final word yet"),
                delivered=integer("Delivered"),
                failed=integer("Failed, undelivered, rejected or never confirmed"),
                optedOut=integer("The recipient had opted out"),
                expired=integer("Not sent within its validity"),
                cancelled=integer("Withdrawn by DELETE before a worker took them"),
            ),
            example={
                "batchId": BATCH_EXAMPLE,
                "campaignId": "campaign1",
                "createdAt": "2026-12-01T14:00:00Z",
                "cancelledAt": None,
                "accepted": 3,
                "rejected": 0,
                "queued": 1,
                "sent": 1,
                "delivered": 1,
                "failed": 0,
                "optedOut": 0,
                "expired": 0,
                "cancelled": 0,
            },
        )
    },
)
BULK_TOO_LARGE = text(
    "More recipients than SMSD_BULK_MAX_RECIPIENTS, or a body over SMSD_BULK_MAX_BODY_BYTES: "
    "nothing is stored",
    "too many recipients: at most 100000 in one request",
)
BULK_ERRORS = {
    400: BAD_PARAMETER,
    401: UNAUTHORIZED,
    403: TOKEN_EXPIRED,
    404: NOT_FOUND,
    413: BULK_TOO_LARGE,
    422: IDEMPOTENCY_CONFLICT,
    500: FAILED,
}
BATCH_ERRORS = {
    400: text(
        "A path parameter with control characters in it",
        "missing or invalid parameter batchId",
    ),
    401: UNAUTHORIZED,
    404: text("No such batch in this account", f"Batch {BATCH_EXAMPLE} was not found"),
    500: UNEXPECTED,
}
