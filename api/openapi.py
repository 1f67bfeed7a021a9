"""OpenAPI pieces for handlers that read their own body (so that 401 is checked before 400)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)


def json_object(required: list[str], **properties: Schema) -> Schema:
    return Schema(type=OpenAPIType.OBJECT, properties=dict(properties), required=required or None)


def string(description: str, example: Any = None) -> Schema:
    return Schema(
        type=OpenAPIType.STRING, description=description, examples=[example] if example else None
    )


def integer(description: str) -> Schema:
    return Schema(type=OpenAPIType.INTEGER, description=description)


def operation_with_body(schema: Schema) -> type[Operation]:
    """An Operation class that documents `schema` as the JSON request body."""

    @dataclass
    class _WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)}, required=False
            )

    return _WithBody


SEND_SMS_BODY = json_object(
    [],
    **{
        "from": string(
            "Sender number or id; one of the account's senders (optional)", "+12025550143"
        ),
        "callerId": string(
            "Customer phone number; any format phonenumbers reads", "+972 54 4696388"
        ),
        "jpToken": string("Token from generateToken (required for version 3)", "Aejhib7"),
        "additionalParams": string(
            "Query string appended to the campaign link", "var1=value1&var2=value"
        ),
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
            "Sender number or id; one of the account's senders (optional)", "+12025550143"
        ),
        "callerId": string("Customer phone number", "+972 54 4696388"),
        "additionalParams": string("Query string appended to the campaign link", "var1=value1"),
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
