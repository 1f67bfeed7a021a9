"""The worker's side of a message: claim it, then record what the provider said.

A claim is a conditional UPDATE: of any number of copies of a send task (broker redelivery,
sweeper re-publish, a retried publish) exactly one wins it, so none sends twice."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import CursorResult, and_, or_, select, text, update
from sqlalchemy.orm import Session

from shared.lifecycle import StatusReport, apply_status
from shared.models import Account, Message, MessageStatus, ProviderAccount
from shared.providers import ProviderError
from shared.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Claim:
    """A message this worker now owns until `lease_expires_at`."""

    sid: str
    to_number: str
    from_number: str
    body: str
    provider: str
    provider_account_id: int
    credentials: dict[str, Any]
    attempts: int
    expires_at: datetime
    # The previous owner's lease ran out mid-send: the provider may or may not have it.
    in_doubt: bool
    tenant_id: str = ""
    campaign_id: str = ""


def claim(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    """Take the message for sending, or None when it is not ours to send (now or ever)."""
    row = session.execute(
        select(Message, ProviderAccount.credentials, Account.tenant_id)
        .join(ProviderAccount, ProviderAccount.id == Message.provider_account_id)
        .join(Account, Account.id == Message.account_id)
        .where(Message.sid == sid)
    ).first()
    if row is None:
        log.warning("send.unknown_message")
        return None
    message, credentials, tenant_id = row
    structlog.contextvars.bind_contextvars(account=tenant_id, campaign=message.campaign_id)
    status = MessageStatus(message.status)
    in_flight = (
        status is MessageStatus.SENDING
        and message.lease_expires_at is not None
        and message.lease_expires_at > now
    )
    if status not in (MessageStatus.QUEUED, MessageStatus.SENDING) or in_flight:
        log.info("send.skipped", status=status.value, in_flight=in_flight)
        return None
    if status is MessageStatus.SENDING and message.attempts >= settings.max_send_attempts:
        # Workers keep dying on this one (a poison message?): stop instead of looping forever.
        apply_status(
            session,
            sid,
            StatusReport(
                MessageStatus.FAILED,
                source="worker",
                error_code="attempts-exhausted",
                error_message="the worker sending it was lost on every attempt",
            ),
            now,
        )
        return None
    if message.expires_at <= now:
        apply_status(
            session,
            sid,
            StatusReport(
                MessageStatus.EXPIRED,
                source="worker",
                error_message="not sent within its validity period",
            ),
            now,
        )
        return None
    result = session.execute(
        update(Message)
        .where(
            Message.sid == sid,
            Message.status == message.status,
            Message.attempts == message.attempts,
        )
        .values(
            status=MessageStatus.SENDING.value,
            attempts=Message.attempts + 1,
            claimed_at=now,
            lease_expires_at=now + settings.send_lease,
            updated_at=now,
        )
        # Leave `message` as it was read: the Claim below is built from the pre-claim values.
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        log.info("send.claim_lost")
        return None
    return Claim(
        sid=sid,
        to_number=message.to_number,
        from_number=message.from_number,
        body=message.body,
        provider=message.provider,
        provider_account_id=message.provider_account_id,
        credentials=dict(credentials or {}),
        attempts=message.attempts + 1,
        expires_at=message.expires_at,
        in_doubt=status is MessageStatus.SENDING,
        tenant_id=tenant_id,
        campaign_id=message.campaign_id,
    )


def record_accepted(
    session: Session, claim: Claim, provider_message_id: str, provider_status: str, now: datetime
) -> None:
    """The provider has it: status `sent` (unless a callback already said more), smsSent."""
    apply_status(
        session,
        claim.sid,
        StatusReport(
            MessageStatus.SENT,
            source="worker",
            provider=claim.provider,
            provider_message_id=provider_message_id,
            provider_status=provider_status,
        ),
        now,
    )
    # If a delivery receipt overtook us the status did not move, but the id must still be kept.
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid, Message.provider_message_id.is_(None))
        .values(provider_message_id=provider_message_id)
    )


def record_failed(session: Session, claim: Claim, error: ProviderError, now: datetime) -> None:
    """A final failure, with the provider's code and text kept for the operator."""
    apply_status(
        session,
        claim.sid,
        StatusReport(
            MessageStatus.FAILED,
            source="worker",
            provider=claim.provider,
            error_code=error.code,
            error_message=error.message,
        ),
        now,
    )


def schedule_retry(
    session: Session, claim: Claim, error: ProviderError, settings: Settings, now: datetime
) -> timedelta | None:
    """Hand the message back for a later attempt; None when it is out of attempts or time."""
    delay = retry_delay(claim.attempts, settings)
    if claim.attempts >= settings.max_send_attempts or now + delay >= claim.expires_at:
        record_failed(session, claim, error, now)
        return None
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid, Message.status == MessageStatus.SENDING.value)
        .values(
            status=MessageStatus.QUEUED.value,
            lease_expires_at=None,
            published_at=None,
            next_attempt_at=now + delay,
            error_code=error.code,
            error_message=error.message,
            updated_at=now,
        )
    )
    log.warning("send.retry", attempt=claim.attempts, delay=delay.total_seconds(), error=str(error))
    return delay


def retry_delay(attempt: int, settings: Settings) -> timedelta:
    """Exponential backoff with full jitter, capped well below the broker's visibility timeout."""
    ceiling = min(
        settings.retry_backoff_base.total_seconds() * 2 ** (attempt - 1),
        settings.retry_backoff_max.total_seconds(),
        settings.broker_visibility_timeout.total_seconds() / 2,
    )
    return timedelta(seconds=ceiling * (0.5 + random.random() / 2))


def mark_published(session: Session, sids: list[str], now: datetime) -> None:
    """Note that the send tasks are on the queue, so the sweeper leaves them alone."""
    if session.get_bind().dialect.name == "postgresql":
        # Losing this mark in a crash only costs a harmless re-publish, so skip the fsync wait.
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    session.execute(
        update(Message)
        .where(Message.sid.in_(sids))
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )


def due_for_publish(session: Session, settings: Settings, now: datetime) -> list[str]:
    """What the sweeper must (re-)publish; publishing marks them, so the next sweep skips them.

    - committed but never published (the API died between commit and publish, or the broker
      was down), once its retry time has come;
    - published but never claimed for a long time (the broker lost it);
    - claimed by a worker whose lease ran out (the worker died mid-send).
    """
    due = or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now)
    query = (
        select(Message.sid)
        .where(
            or_(
                and_(
                    Message.status == MessageStatus.QUEUED.value,
                    Message.published_at.is_(None),
                    Message.created_at <= now - settings.sweep_unpublished_after,
                    due,
                ),
                and_(
                    Message.status == MessageStatus.QUEUED.value,
                    Message.published_at <= now - settings.sweep_unclaimed_after,
                    due,
                ),
                and_(
                    Message.status == MessageStatus.SENDING.value,
                    Message.lease_expires_at <= now,
                    # Not yet re-published since the lease ran out (or that copy was lost too).
                    or_(
                        Message.published_at.is_(None),
                        Message.published_at < Message.lease_expires_at,
                        Message.published_at <= now - settings.sweep_unclaimed_after,
                    ),
                ),
            )
        )
        .order_by(Message.created_at)
        .limit(settings.sweep_batch_size)
    )
    # Two overlapping sweeps may pick the same rows; the duplicate tasks lose the claim.
    return list(session.scalars(query))
