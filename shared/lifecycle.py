"""Status changes: the one place a message's status moves, always forwards.

The worker (provider accepted, failed), the provider callbacks and the sweeper all come here,
so "a final status is never moved backwards" is enforced once, by a conditional UPDATE."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import CursorResult, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from shared.models import (
    SENT_BY_SERVICE,
    Account,
    DeflectedCall,
    DeliveryEvent,
    Message,
    MessageStatus,
    table_of,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A status as some source saw it: the worker, a provider callback, the sweeper."""

    status: MessageStatus
    source: str
    provider: str | None = None
    provider_status: str | None = None
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    payload: dict[str, Any] | None = None


def apply_status(session: Session, sid: str | None, report: StatusReport, now: datetime) -> bool:
    """Move the message to `report.status` if that is forwards; record the event either way."""
    current: str | None = None
    applied = False
    for _ in range(3):  # a concurrent writer may move the status between our read and write
        row = (
            session.execute(
                select(Message.status, Message.campaign_id, Account.tenant_id)
                .join(Account, Account.id == Message.account_id)
                .where(Message.sid == sid)
            ).first()
            if sid
            else None
        )
        current = row.status if row else None
        if row is None:
            break
        # Every log line about a message names it, its account and its campaign.
        structlog.contextvars.bind_contextvars(
            messageSid=sid, account=row.tenant_id, campaign=row.campaign_id
        )
        if not _is_forward(MessageStatus(row.status), report.status):
            break
        result = session.execute(
            update(Message)
            .where(Message.sid == sid, Message.status == current)
            .values(**_status_columns(report, now))
        )
        assert isinstance(result, CursorResult)
        if result.rowcount == 1:
            applied = True
            break
    session.add(
        DeliveryEvent(**_event_columns(sid if current is not None else None, report, applied, now))
    )
    if current is None:
        log.warning("message.status_unmatched", status=report.status.value, source=report.source)
    elif applied:
        log.info("message.status", status=report.status.value, source=report.source)
        if sid and report.status in (MessageStatus.SENT, MessageStatus.DELIVERED):
            first_acceptance = MessageStatus(current).rank < MessageStatus.SENT.rank
            _mark_deflected_call(session, sid, report.status, now, first_acceptance)
    else:
        log.info("message.status_ignored", status=report.status.value, current=current)
    return applied


def sent_from_sending(session: Session, sid: str, report: StatusReport, now: datetime) -> bool:
    """`apply_status` for the worker's own `sent` on the message it holds, in one UPDATE that
    also returns what smsSent needs. False when the message was not `sending` (a callback got
    there first): then nothing was written, and the caller takes the general way."""
    connection = session.connection()
    row = connection.execute(
        _SENT_FROM_SENDING,
        {
            "message_sid": sid,
            "now": now,
            "provider_message_id_": report.provider_message_id,
        },
    ).first()
    if row is None:
        return False
    connection.execute(_INSERT_EVENT, _event_columns(sid, report, True, now))
    log.info("message.status", status=report.status.value, source=report.source)
    if row.token_id is not None:
        # `sending` is below `sent`: this is the provider's first acceptance of the message.
        connection.execute(
            _FIRST_SENT_FOR_CALL,
            {"token_id_": row.token_id, "now": now, "campaign": row.campaign_id, "sid_": sid},
        )
    return True


_messages = table_of(Message)
_calls = table_of(DeflectedCall)
# Built once: constructing and hashing these costs more CPU than running them. The same
# columns as `_status_columns` and `_update_deflected_call` write, for a `sent` from `sending`.
_SENT_FROM_SENDING = (
    update(_messages)
    .where(
        _messages.c.sid == bindparam("message_sid"),
        _messages.c.status == MessageStatus.SENDING.value,
    )
    .values(
        status=MessageStatus.SENT.value,
        updated_at=bindparam("now"),
        lease_expires_at=None,
        sent_at=func.coalesce(_messages.c.sent_at, bindparam("now")),
        provider_message_id=func.coalesce(
            _messages.c.provider_message_id, bindparam("provider_message_id_")
        ),
    )
    .returning(_messages.c.token_id, _messages.c.campaign_id)
)
_INSERT_EVENT = insert(table_of(DeliveryEvent))
_FIRST_SENT_FOR_CALL = (
    update(_calls)
    .where(_calls.c.token_id == bindparam("token_id_"))
    .values(
        sms_sent=True,
        sms_sent_at=func.coalesce(_calls.c.sms_sent_at, bindparam("now")),
        sms_sent_by=func.coalesce(_calls.c.sms_sent_by, SENT_BY_SERVICE),
        campaign_id=bindparam("campaign"),
        last_message_sid=bindparam("sid_"),
        sms_count=_calls.c.sms_count + 1,
    )
)


def _event_columns(
    sid: str | None, report: StatusReport, applied: bool, now: datetime
) -> dict[str, Any]:
    return dict(
        message_sid=sid,
        source=report.source,
        status=report.status.value,
        provider=report.provider,
        provider_message_id=report.provider_message_id,
        provider_status=report.provider_status,
        error_code=report.error_code,
        applied=applied,
        payload=report.payload,
        created_at=now,
    )


def _is_forward(old: MessageStatus, new: MessageStatus) -> bool:
    return not old.is_final and new.rank > old.rank


def _status_columns(report: StatusReport, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {"status": report.status.value, "updated_at": now}
    if report.status.rank >= MessageStatus.SENT.rank:
        values["lease_expires_at"] = None
    if report.status in (MessageStatus.SENT, MessageStatus.DELIVERED):
        # A delivery receipt can overtake the worker's own "sent": both imply the provider has it.
        values["sent_at"] = func.coalesce(Message.sent_at, now)
    if report.status is MessageStatus.DELIVERED:
        values["delivered_at"] = now
    if report.status.is_final:
        values["final_at"] = now
    if report.provider_message_id is not None:
        values["provider_message_id"] = func.coalesce(
            Message.provider_message_id, report.provider_message_id
        )
    if report.error_code is not None or report.error_message is not None:
        values["error_code"] = report.error_code
        values["error_message"] = report.error_message
    return values


def _mark_deflected_call(
    session: Session, sid: str, status: MessageStatus, now: datetime, first_acceptance: bool
) -> None:
    """smsSent for the Deflected Call Report: true once a provider has a message for the call.

    A call may get several SMS (the IVR asked again): the times are the call's firsts, the
    messageSid and campaign its latest SMS, and smsCount how many a provider took."""
    message = session.execute(
        select(Message.token_id, Message.campaign_id).where(Message.sid == sid)
    ).one()
    if message.token_id is not None:
        _update_deflected_call(
            session, sid, message.token_id, message.campaign_id, status, now, first_acceptance
        )


def _update_deflected_call(
    session: Session,
    sid: str,
    token_id: int,
    campaign_id: str,
    status: MessageStatus,
    now: datetime,
    first_acceptance: bool,
) -> None:
    values: dict[str, Any] = {
        "sms_sent": True,
        "sms_sent_at": func.coalesce(DeflectedCall.sms_sent_at, now),
        "sms_sent_by": func.coalesce(DeflectedCall.sms_sent_by, SENT_BY_SERVICE),
        "campaign_id": campaign_id,
        "last_message_sid": sid,
    }
    if first_acceptance:
        values["sms_count"] = DeflectedCall.sms_count + 1
    if status is MessageStatus.DELIVERED:
        values["sms_delivered_at"] = func.coalesce(DeflectedCall.sms_delivered_at, now)
    session.execute(
        update(DeflectedCall).where(DeflectedCall.token_id == token_id).values(**values)
    )


def find_sid(session: Session, provider: str, provider_message_id: str | None) -> str | None:
    """Our messageSid for a provider's message id, for callbacks that do not carry ours."""
    if not provider_message_id:
        return None
    return session.scalar(
        select(Message.sid).where(
            Message.provider == provider, Message.provider_message_id == provider_message_id
        )
    )
