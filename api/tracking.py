"""Looking a message up by messageSid, and the Deflected Call Report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import structlog
from litestar import get
from litestar.params import FromPath, QueryParameter
from sqlalchemy.orm import Session

from api.dependencies import TransactionsDep
from api.headers import V3, ApplicationKey, TenantId
from api.openapi import BAD_PARAMETER, SID_EXAMPLE, UNAUTHORIZED, UNEXPECTED, documented, text
from shared.accounts.access import authenticate
from shared.calls.reports import DeflectedCallView, MessageView, deflected_calls, message_view
from shared.core.errors import InvalidParameter, MessageNotFound
from shared.core.models import utcnow

log = structlog.get_logger(__name__)

MAX_REPORT_ROWS = 10_000
DEFAULT_REPORT_ROWS = 1000
EARLIEST = datetime.min.replace(tzinfo=UTC)
DEFAULT_SPAN = timedelta(hours=24)
MAX_INSTANT_LENGTH = 64  # "2024-01-31T23:59:59.999999+00:00" is 32


@get(
    f"{V3}/messages/{{message_sid:str}}",
    summary="Message status",
    description="A message's status, provider ids and every status event, by messageSid.",
    tags=["Tracking"],
    operation_class=documented(
        errors={
            400: text(
                "A messageSid that cannot be one (control characters, too long)",
                "missing or invalid parameter messageSid",
            ),
            401: UNAUTHORIZED,
            404: text("No such message in this account", f"Message {SID_EXAMPLE} was not found"),
            500: UNEXPECTED,
        }
    ),
)
async def get_message(
    transactions: TransactionsDep,
    account_id: FromPath[str],
    message_sid: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
) -> MessageView:
    def load(session: Session) -> MessageView | None:
        account = authenticate(session, account_id, tenant_id, application_key)
        return message_view(session, account, message_sid)

    view = await transactions.run_unbounded(load)
    if view is None:
        raise MessageNotFound(message_sid)
    return view


@get(
    f"{V3}/reports/deflected-calls",
    summary="Deflected Call Report",
    description=(
        "One row per call (per jpToken issued in the range): when the token was issued, whether "
        "an SMS was sent for it (`smsSent`) and when, and when it was delivered."
    ),
    tags=["Reports"],
    operation_class=documented(errors={400: BAD_PARAMETER, 401: UNAUTHORIZED, 500: UNEXPECTED}),
)
async def deflected_call_report(
    transactions: TransactionsDep,
    account_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    since: Annotated[
        str | None, QueryParameter(name="from", description="ISO 8601; default: 24 hours ago")
    ] = None,
    until: Annotated[
        str | None, QueryParameter(name="to", description="ISO 8601; default: now")
    ] = None,
    limit: Annotated[
        str | None,
        QueryParameter(
            description=f"Rows, 1 to {MAX_REPORT_ROWS} (default {DEFAULT_REPORT_ROWS})",
            # Read as text so a bad value is our 400 naming `limit`, documented as what it is.
            schema_extra={
                "type": "integer",
                "one_of": None,
                "minimum": 1,
                "maximum": MAX_REPORT_ROWS,
            },
        ),
    ] = None,
) -> list[DeflectedCallView]:
    def load(session: Session) -> list[DeflectedCallView]:
        account = authenticate(session, account_id, tenant_id, application_key)
        end = _instant(until, "to") or utcnow()
        start = _instant(since, "from") or _day_before(end)
        return deflected_calls(session, account, start, end, _limit(limit))

    return await transactions.run_unbounded(load)


def _instant(value: str | None, parameter: str) -> datetime | None:
    """An ISO 8601 instant with a zone, in UTC; anything else is the caller's 400."""
    if value is None:
        return None
    # fromisoformat reads some non-ASCII digits; what the report promises is ISO 8601.
    if not value.isascii() or len(value) > MAX_INSTANT_LENGTH:
        log.warning("request.unusable_parameter", parameter=parameter, length=len(value))
        raise InvalidParameter(parameter)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("a time without a zone is ambiguous")
        # Instants at the calendar's very edge cannot be moved to UTC: those are bad input too.
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidParameter(parameter) from None


def _day_before(end: datetime) -> datetime:
    return end - DEFAULT_SPAN if end - EARLIEST > DEFAULT_SPAN else EARLIEST


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_REPORT_ROWS
    # ASCII digits only: isdigit() also takes "²" (which int() refuses) and "٣" (which it
    # reads as 3), and the length check comes before int(), which refuses 4,300 digits.
    if not (value.isascii() and value.isdigit() and len(value) <= len(str(MAX_REPORT_ROWS))):
        log.warning("request.unusable_parameter", parameter="limit", length=len(value))
        raise InvalidParameter("limit")
    if not 1 <= int(value) <= MAX_REPORT_ROWS:
        raise InvalidParameter("limit")
    return int(value)
