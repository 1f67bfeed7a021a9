"""Read side: one message with its history, and the Deflected Call Report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from shared.calls import queries
from shared.core.models import Account, StatusCallback
from shared.text.callback_urls import shown_url

SID_SHAPE = re.compile(r"SM[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class EventView:
    at: datetime
    source: str
    status: str | None
    applied: bool
    providerStatus: str | None  # noqa: N815
    errorCode: str | None  # noqa: N815


@dataclass(frozen=True, slots=True)
class CallbackAttemptView:
    at: datetime
    # The receiver's HTTP status; None when no answer came (see `error`).
    responseStatus: int | None  # noqa: N815
    error: str | None
    durationMs: int  # noqa: N815


@dataclass(frozen=True, slots=True)
class CallbackView:
    """One status change as POSTed to the message's statusCallback."""

    eventId: str  # noqa: N815
    status: str
    changedAt: datetime  # noqa: N815
    # `pending`, `delivered` or `given_up`.
    state: str
    nextAttemptAt: datetime | None  # noqa: N815 - while pending
    attempts: list[CallbackAttemptView]


@dataclass(frozen=True, slots=True)
class MessageView:
    messageSid: str  # noqa: N815 - the API's own spelling
    status: str
    campaignId: str  # noqa: N815
    to: str
    sender: str
    body: str
    segments: int
    encoding: str  # `gsm7` or `ucs2`: what `segments` is counted in
    provider: str
    providerMessageId: str | None  # noqa: N815
    attempts: int
    errorCode: str | None  # noqa: N815
    errorMessage: str | None  # noqa: N815
    createdAt: datetime  # noqa: N815
    sentAt: datetime | None  # noqa: N815
    deliveredAt: datetime | None  # noqa: N815
    # When the reconciler last asked the provider about it (no receipt came in time).
    reconciledAt: datetime | None  # noqa: N815
    events: list[EventView]
    # Where its status changes are POSTed (a password in the URL hidden), and each change
    # with every delivery attempt; empty without a statusCallback.
    statusCallback: str | None = None  # noqa: N815
    callbacks: list[CallbackView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeflectedCallView:
    jpToken: str  # noqa: N815
    callerId: str  # noqa: N815
    campaignId: str | None  # noqa: N815
    tokenIssuedAt: datetime  # noqa: N815
    smsSent: bool  # noqa: N815
    smsSentAt: datetime | None  # noqa: N815
    smsSentBy: str | None  # noqa: N815 - `service`, or `external` after Notify SMS
    smsDeliveredAt: datetime | None  # noqa: N815
    messageSid: str | None  # noqa: N815 - the call's latest SMS
    smsCount: int  # noqa: N815
    # The latest SMS's status, and whether it came from asking the provider (reconciliation)
    # rather than from a receipt; None for a call without one.
    smsStatus: str | None  # noqa: N815
    smsReconciled: bool  # noqa: N815
    linkClicks: int  # noqa: N815
    linkFirstClickedAt: datetime | None  # noqa: N815


def message_view(session: Session, account: Account, sid: str) -> MessageView | None:
    """A message of this account with every event in order; None for another account's sid."""
    if not SID_SHAPE.fullmatch(sid):
        return None  # not a messageSid at all (and nothing PostgreSQL should be asked about)
    message = queries.message_of_account(session, account.id, sid)
    if message is None:
        return None
    events = queries.events_of(session, sid)
    return MessageView(
        messageSid=message.sid,
        status=message.status,
        campaignId=message.campaign_id,
        to=message.to_number,
        sender=message.from_number,
        body=message.body,
        segments=message.segments,
        encoding=message.encoding,
        provider=message.provider,
        providerMessageId=message.provider_message_id,
        attempts=message.attempts,
        errorCode=message.error_code,
        errorMessage=message.error_message,
        createdAt=message.created_at,
        sentAt=message.sent_at,
        deliveredAt=message.delivered_at,
        reconciledAt=message.reconciled_at,
        events=[
            EventView(
                at=e.created_at,
                source=e.source,
                status=e.status,
                applied=e.applied,
                providerStatus=e.provider_status,
                errorCode=e.error_code,
            )
            for e in events
        ],
        statusCallback=shown_url(message.status_callback) if message.status_callback else None,
        callbacks=[
            CallbackView(
                eventId=StatusCallback.event_id(sid, ordinal),
                status=callback.status,
                changedAt=callback.changed_at,
                state=callback.outcome or "pending",
                nextAttemptAt=None if callback.done_at else callback.next_attempt_at,
                attempts=[
                    CallbackAttemptView(
                        at=a.attempted_at,
                        responseStatus=a.response_status,
                        error=a.error,
                        durationMs=a.duration_ms,
                    )
                    for a in attempts
                ],
            )
            for ordinal, (callback, attempts) in enumerate(
                queries.status_callbacks_of(session, sid), start=1
            )
        ],
    )


def deflected_calls(
    session: Session, account: Account, since: datetime, until: datetime, limit: int
) -> list[DeflectedCallView]:
    """Calls whose token was issued in [since, until), oldest first."""
    rows = queries.deflected_call_rows(session, account.id, since, until, limit)
    return [
        DeflectedCallView(
            jpToken=token,
            callerId=caller,
            campaignId=call.campaign_id,
            tokenIssuedAt=call.token_issued_at,
            smsSent=call.sms_sent,
            smsSentAt=call.sms_sent_at,
            smsSentBy=call.sms_sent_by,
            smsDeliveredAt=call.sms_delivered_at,
            messageSid=call.last_message_sid,
            smsCount=call.sms_count,
            smsStatus=status,
            smsReconciled=reconciled_at is not None,
            linkClicks=call.link_clicks,
            linkFirstClickedAt=call.link_first_clicked_at,
        )
        for call, token, caller, status, reconciled_at in rows
    ]
