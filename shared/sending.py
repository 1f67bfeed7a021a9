"""The worker's side of a message: claim it, then record what the provider said.

A claim is a conditional UPDATE: of any number of copies of a send task (broker redelivery,
sweeper re-publish, a retried publish) exactly one wins it, so none sends twice."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    and_,
    bindparam,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from shared.lifecycle import StatusReport, apply_status, record_parts, sent_from_sending
from shared.models import Account, Message, MessageStatus, OptOut, ProviderAccount, table_of
from shared.optout import is_opted_out
from shared.phone import normalise_sender
from shared.providers import ProviderError
from shared.settings import Settings
from shared.throttle import Rate

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
    segments: int = 1
    max_attempts: int = 5
    provider_failures: int = 0
    # The account whose provider settings these are (the system account's, if borrowed).
    owner_id: int = 0
    sender_rate: float | None = None
    account_rate: float | None = None

    def rates(self) -> list[Rate]:
        """The throughput limits this send counts against (in segments per second)."""
        limits = []
        if self.sender_rate:
            limits.append(Rate(f"{self.provider_account_id}:{self.from_number}", self.sender_rate))
        if self.account_rate:
            limits.append(Rate(f"{self.provider_account_id}", self.account_rate))
        return limits


_messages = table_of(Message)
_providers = table_of(ProviderAccount)
_accounts = table_of(Account)
_opt_outs = table_of(OptOut)
# Built once (constructing and hashing a statement costs more CPU than running it), and run on
# the session's connection as plain SQL: the message is not in the session's identity map.
_CLAIM_QUEUED = (
    update(_messages)
    .where(
        _messages.c.sid == bindparam("message_sid"),
        _messages.c.status == MessageStatus.QUEUED.value,
        _messages.c.expires_at > bindparam("now"),
        _providers.c.id == _messages.c.provider_account_id,
        _accounts.c.id == _messages.c.account_id,
        ~select(_opt_outs.c.id)
        .where(
            _opt_outs.c.account_id == _providers.c.account_id,
            _opt_outs.c.sender == _messages.c.from_number,
            _opt_outs.c.recipient == _messages.c.to_number,
        )
        .exists(),
    )
    .values(
        status=MessageStatus.SENDING.value,
        attempts=_messages.c.attempts + 1,
        claimed_at=bindparam("now"),
        lease_expires_at=bindparam("lease"),
        updated_at=bindparam("now"),
    )
    .returning(
        _messages.c.to_number,
        _messages.c.from_number,
        _messages.c.body,
        _messages.c.attempts,
        _messages.c.expires_at,
        _messages.c.campaign_id,
        _messages.c.segments,
        _messages.c.provider_failures,
        _providers.c.id.label("provider_account_id"),
        _providers.c.provider,
        _providers.c.credentials,
        _providers.c.account_id.label("owner_id"),
        _providers.c.sender_rate,
        _providers.c.account_rate,
        _accounts.c.tenant_id,
        _accounts.c.max_send_attempts,
    )
)


def claim(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    """Take the message for sending, or None when it is not ours to send (now or ever)."""
    if session.get_bind().dialect.name == "postgresql":
        fast = _claim_queued(session, sid, settings, now)
        if fast is not None:
            return fast
    # Everything else (already taken, a dead worker's lease, expired, opted out, unknown), and
    # every claim on SQLite, which cannot return another table's columns from an UPDATE.
    return _claim_any(session, sid, settings, now)


def _claim_queued(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    """The common case in one statement: a queued message, in time, to a recipient who did not
    opt out. Taken and read back with its provider settings, or None for `_claim_any` to judge."""
    row = (
        session.connection()
        .execute(
            _CLAIM_QUEUED, {"message_sid": sid, "now": now, "lease": now + settings.send_lease}
        )
        .first()
    )
    if row is None:
        return None
    structlog.contextvars.bind_contextvars(account=row.tenant_id, campaign=row.campaign_id)
    return Claim(
        sid=sid,
        to_number=row.to_number,
        from_number=row.from_number,
        body=row.body,
        provider=row.provider,
        provider_account_id=row.provider_account_id,
        credentials=dict(row.credentials or {}),
        attempts=row.attempts,
        expires_at=row.expires_at,
        in_doubt=False,
        tenant_id=row.tenant_id,
        campaign_id=row.campaign_id,
        segments=row.segments,
        max_attempts=row.max_send_attempts or settings.max_send_attempts,
        provider_failures=row.provider_failures,
        owner_id=row.owner_id,
        sender_rate=row.sender_rate,
        account_rate=row.account_rate,
    )


def _claim_any(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    row = session.execute(
        select(Message, ProviderAccount, Account.tenant_id, Account.max_send_attempts)
        .join(ProviderAccount, ProviderAccount.id == Message.provider_account_id)
        .join(Account, Account.id == Message.account_id)
        .where(Message.sid == sid)
    ).first()
    if row is None:
        log.warning("send.unknown_message")
        return None
    message, provider_account, tenant_id, account_max_attempts = row
    structlog.contextvars.bind_contextvars(account=tenant_id, campaign=message.campaign_id)
    max_attempts = account_max_attempts or settings.max_send_attempts
    status = MessageStatus(message.status)
    in_flight = (
        status is MessageStatus.SENDING
        and message.lease_expires_at is not None
        and message.lease_expires_at > now
    )
    if status not in (MessageStatus.QUEUED, MessageStatus.SENDING) or in_flight:
        log.info("send.skipped", status=status.value, in_flight=in_flight)
        return None
    if status is MessageStatus.SENDING and message.attempts >= max_attempts:
        # Workers keep dying on this one (a poison message?): stop instead of looping forever.
        _finish(
            session,
            sid,
            MessageStatus.FAILED,
            now,
            "attempts-exhausted",
            "the worker sending it was lost on every attempt",
        )
        return None
    if message.expires_at <= now:
        _finish(
            session, sid, MessageStatus.EXPIRED, now, None, "not sent within its validity period"
        )
        return None
    if is_opted_out(session, provider_account.account_id, message.from_number, message.to_number):
        _finish(
            session,
            sid,
            MessageStatus.OPTED_OUT,
            now,
            "opted-out",
            "the recipient opted out of this sender",
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
    return _claim_of(
        message,
        provider_account,
        tenant_id=tenant_id,
        attempts=message.attempts + 1,
        max_attempts=max_attempts,
        in_doubt=status is MessageStatus.SENDING,
    )


def _claim_of(
    message: Message,
    provider_account: ProviderAccount,
    *,
    tenant_id: str,
    attempts: int,
    max_attempts: int,
    in_doubt: bool,
    from_number: str | None = None,
    provider_failures: int | None = None,
) -> Claim:
    return Claim(
        sid=message.sid,
        to_number=message.to_number,
        from_number=from_number or message.from_number,
        body=message.body,
        provider=provider_account.provider,
        provider_account_id=provider_account.id,
        credentials=dict(provider_account.credentials or {}),
        attempts=attempts,
        expires_at=message.expires_at,
        in_doubt=in_doubt,
        tenant_id=tenant_id,
        campaign_id=message.campaign_id,
        segments=message.segments,
        max_attempts=max_attempts,
        provider_failures=(
            message.provider_failures if provider_failures is None else provider_failures
        ),
        owner_id=provider_account.account_id,
        sender_rate=provider_account.sender_rate,
        account_rate=provider_account.account_rate,
    )


def _finish(
    session: Session,
    sid: str,
    status: MessageStatus,
    now: datetime,
    code: str | None,
    text_: str,
) -> None:
    apply_status(
        session,
        sid,
        StatusReport(status, source="worker", error_code=code, error_message=text_),
        now,
    )


def fail_over(
    session: Session,
    owned: Claim,
    settings: Settings,
    now: datetime,
    healthy: Callable[[int], bool],
) -> Claim | None:
    """Move the claimed message to the owner's next usable provider; None if there is none.

    Providers are tried in priority order, wrapping around, skipping expired ones and those
    whose circuit is open; the sender changes to the new provider's unless it has the same."""
    candidates = session.scalars(
        select(ProviderAccount)
        .where(ProviderAccount.account_id == owned.owner_id)
        .order_by(ProviderAccount.priority, ProviderAccount.id)
    ).all()
    usable = [
        c
        for c in candidates
        if (c.expires_at is None or c.expires_at > now)
        and (c.id == owned.provider_account_id or healthy(c.id))
    ]
    ids = [c.id for c in usable]
    if owned.provider_account_id not in ids or len(usable) < 2:
        return None
    following = usable[(ids.index(owned.provider_account_id) + 1) % len(usable)]
    senders = [normalise_sender(s, settings.default_region) for s in following.sender_ids]
    if not senders:
        return None
    sender = owned.from_number if owned.from_number in senders else senders[0]
    result = session.execute(
        update(Message)
        .where(
            Message.sid == owned.sid,
            Message.status == MessageStatus.SENDING.value,
            Message.provider_account_id == owned.provider_account_id,
        )
        .values(
            provider=following.provider,
            provider_account_id=following.id,
            from_number=sender,
            provider_failures=0,
            updated_at=now,
        )
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        return None
    message = session.get_one(Message, owned.sid)
    log.warning(
        "send.failover",
        from_provider=owned.provider,
        to_provider=following.provider,
        provider_account=following.id,
    )
    return _claim_of(
        message,
        following,
        tenant_id=owned.tenant_id,
        attempts=owned.attempts,
        max_attempts=owned.max_attempts,
        in_doubt=owned.in_doubt,
        from_number=sender,
        provider_failures=0,
    )


def release(session: Session, owned: Claim, delay: timedelta, now: datetime) -> None:
    """Hand the message back unsent (its sender is at its rate limit): no attempt is spent."""
    session.execute(
        update(Message)
        .where(Message.sid == owned.sid, Message.status == MessageStatus.SENDING.value)
        .values(
            status=MessageStatus.QUEUED.value,
            attempts=Message.attempts - 1,
            lease_expires_at=None,
            published_at=None,
            next_attempt_at=now + delay,
            updated_at=now,
        )
    )


def record_accepted(
    session: Session,
    claim: Claim,
    provider_message_id: str,
    provider_status: str,
    now: datetime,
    *,
    parts: tuple[str, ...] = (),
    unsent_parts: int = 0,
) -> None:
    """The provider has it: status `sent` (unless a callback already said more), smsSent.

    A message the provider took as several parts keeps every part's id, so each part's
    receipt counts and `delivered` waits for all of them."""
    report = StatusReport(
        MessageStatus.SENT,
        source="worker",
        provider=claim.provider,
        provider_message_id=provider_message_id,
        provider_status=provider_status,
    )
    if len(parts) > 1 or unsent_parts:
        settled = record_parts(
            session, claim.sid, parts or (provider_message_id,), unsent_parts, now
        )
        if settled is not None:
            apply_status(
                session,
                claim.sid,
                StatusReport(
                    settled.status,
                    source="worker",
                    provider=claim.provider,
                    provider_message_id=provider_message_id,
                    error_code=settled.error_code,
                ),
                now,
            )
    if sent_from_sending(session, claim.sid, report, now):
        return
    # A callback got there first (or the message moved otherwise): the general, careful way.
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


def record_failed(
    session: Session,
    claim: Claim,
    error: ProviderError,
    now: datetime,
    status: MessageStatus = MessageStatus.FAILED,
) -> None:
    """A final failure, with the provider's code and text kept for the operator."""
    apply_status(
        session,
        claim.sid,
        StatusReport(
            status,
            source="worker",
            provider=claim.provider,
            error_code=error.code,
            error_message=error.message,
        ),
        now,
    )


def schedule_retry(
    session: Session,
    claim: Claim,
    error: ProviderError,
    settings: Settings,
    now: datetime,
    *,
    provider_failed: bool = True,
) -> timedelta | None:
    """Hand the message back for a later attempt; None when it is out of attempts or time."""
    delay = retry_delay(claim.attempts, settings)
    if claim.attempts >= claim.max_attempts or now + delay >= claim.expires_at:
        record_failed(session, claim, error, now)
        return None
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid, Message.status == MessageStatus.SENDING.value)
        .values(
            status=MessageStatus.QUEUED.value,
            # Counted against the provider that failed; one just failed over to starts clean.
            provider_failures=Message.provider_failures + (1 if provider_failed else 0),
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


def mark_published(
    session: Session, sids: list[str], now: datetime, *, unchanged_since: datetime | None = None
) -> None:
    """Note that the send tasks are on the queue, so the sweeper leaves them alone.

    With `unchanged_since` (when publishing began) only rows still unmarked and untouched since
    are marked: a worker may have claimed a message and handed it back meanwhile (clearing the
    mark), and a late mark must not hide that from the sweeper."""
    if session.get_bind().dialect.name == "postgresql":
        # Losing this mark in a crash only costs a harmless re-publish, so skip the fsync wait.
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    where: list[ColumnElement[bool]] = [Message.sid.in_(sids)]
    if unchanged_since is not None:
        where += [Message.published_at.is_(None), Message.updated_at <= unchanged_since]
    session.execute(
        update(Message)
        .where(*where)
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
