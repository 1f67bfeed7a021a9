"""Looking a message up by messageSid, and the Deflected Call Report."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import anyio.to_thread
from litestar import MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter

from api.interact import V3, ApplicationKey, TenantId
from api.placement import Placement
from shared.accounts import authenticate
from shared.errors import InvalidParameter
from shared.models import utcnow
from shared.reports import DeflectedCallView, MessageView, deflected_calls, message_view

MAX_REPORT_ROWS = 10_000


@get(
    f"{V3}/messages/{{message_sid:str}}",
    summary="Message status",
    description="A message's status, provider ids and every status event, by messageSid.",
    tags=["Tracking"],
    responses={
        401: ResponseSpec(dict[str, str], description="Missing or wrong credentials"),
        404: ResponseSpec(
            str, description="Message <messageSid> was not found", media_type=MediaType.TEXT
        ),
    },
)
async def get_message(
    request: Request[object, object, State],
    account_id: FromPath[str],
    message_sid: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
) -> Response[MessageView | str]:
    placement: Placement = request.app.state.placement

    def load() -> MessageView | None:
        with placement.db.transaction() as session:
            account = authenticate(session, account_id, tenant_id, application_key)
            return message_view(session, account, message_sid)

    view = await anyio.to_thread.run_sync(load)
    if view is None:
        return Response(
            f"Message {message_sid} was not found", status_code=404, media_type=MediaType.TEXT
        )
    return Response(view, media_type=MediaType.JSON)


@get(
    f"{V3}/reports/deflected-calls",
    summary="Deflected Call Report",
    description=(
        "One row per call (per jpToken issued in the range): when the token was issued, whether "
        "an SMS was sent for it (`smsSent`) and when, and when it was delivered."
    ),
    tags=["Reports"],
    responses={
        400: ResponseSpec(
            str, description="missing or invalid parameter <parameter>", media_type=MediaType.TEXT
        ),
        401: ResponseSpec(dict[str, str], description="Missing or wrong credentials"),
    },
)
async def deflected_call_report(
    request: Request[object, object, State],
    account_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    since: Annotated[
        str | None, QueryParameter(name="from", description="ISO 8601; default: 24 hours ago")
    ] = None,
    until: Annotated[
        str | None, QueryParameter(name="to", description="ISO 8601; default: now")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_REPORT_ROWS)] = 1000,
) -> list[DeflectedCallView]:
    placement: Placement = request.app.state.placement

    def load() -> list[DeflectedCallView]:
        with placement.db.transaction() as session:
            account = authenticate(session, account_id, tenant_id, application_key)
            now = utcnow()
            end = _instant(until, "to") or now
            start = _instant(since, "from") or end - timedelta(hours=24)
            return deflected_calls(session, account, start, end, limit)

    return await anyio.to_thread.run_sync(load)


def _instant(value: str | None, parameter: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidParameter(parameter) from None
    if parsed.tzinfo is None:
        raise InvalidParameter(parameter)  # a time without a zone is ambiguous
    return parsed
