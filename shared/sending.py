"""The worker's side of a message: claim it, then record what the provider said.

A claim is a conditional UPDATE: of any number of copies of a send task (broker redelivery,
sweeper re-publish, a retried publish) exactly one wins it, so none sends twice."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from shared.lifecycle import StatusReport, apply_status, record_parts, sent_from_sending
from shared.models import (
    Account,
    Message,
    MessageStatus,
    OptOut,
    OutboxState,
    ProviderAccount,
    table_of,
)
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
    # A provider call before this one may have reached the provider (the previous owner's
    # lease ran out mid-send, or the call timed out): it may or may not have the message.
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
    # When the doubtful call was made, for looking the message up at the provider.
    doubt_since: datetime | None = None

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
        _messages.c.in_doubt_since,
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
        in_doubt=row.in_doubt_since is not None,
        doubt_since=row.in_doubt_since,
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
    lost_mid_send = status is MessageStatus.SENDING
    return _claim_of(
        message,
        provider_account,
        tenant_id=tenant_id,
        attempts=message.attempts + 1,
        max_attempts=max_attempts,
        in_doubt=lost_mid_send or message.in_doubt_since is not None,
        doubt_since=message.in_doubt_since or (message.claimed_at if lost_mid_send else None),
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
    doubt_since: datetime | None = None,
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
        doubt_since=doubt_since,
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
        doubt_since=owned.doubt_since,
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
    in_doubt: bool = False,
) -> timedelta | None:
    """Hand the message back for a later attempt; None when its validity ends first.
    `in_doubt`: this call may have reached the provider (one that deduplicates, so it is sent
    again, through the same provider only).

    Transient failures are retried for as long as the message is valid, not a fixed number
    of times: an outage of any length within validity loses nothing."""
    delay = retry_delay(claim.attempts, settings)
    if now + delay >= claim.expires_at:
        record_failed(session, claim, error, now, status=MessageStatus.EXPIRED)
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
            # An earlier call in doubt stays in doubt until the message is sent or provably
            # absent (`clear_doubt`): it must not move to another provider meanwhile.
            in_doubt_since=(
                func.coalesce(Message.in_doubt_since, claim.doubt_since or now)
                if in_doubt
                else Message.in_doubt_since
            ),
            error_code=error.code,
            error_message=error.message,
            updated_at=now,
        )
    )
    log.warning("send.retry", attempt=claim.attempts, delay=delay.total_seconds(), error=str(error))
    return delay


def retry_delay(attempt: int, settings: Settings) -> timedelta:
    """Exponential backoff with full jitter, capped at SMSD_RETRY_BACKOFF_MAX. Long waits are
    kept in the database (`next_attempt_at`) and published by the sweeper when due, never held
    by the broker, so no cap below the broker's visibility timeout is needed."""
    exponent = min(max(attempt - 1, 0), 30)
    ceiling = min(
        settings.retry_backoff_base.total_seconds() * 2**exponent,
        settings.retry_backoff_max.total_seconds(),
    )
    return timedelta(seconds=ceiling * (0.5 + random.random() / 2))


def look_up_later(
    session: Session, claim: Claim, error: ProviderError, settings: Settings, now: datetime
) -> timedelta:
    """A call that may have reached a provider that can be searched: look for the message
    there once the provider has surely finished with the request, before sending anything."""
    delay = settings.in_doubt_lookup_after
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid, Message.status == MessageStatus.SENDING.value)
        .values(
            status=MessageStatus.QUEUED.value,
            attempts=Message.attempts - 1,  # not a failed attempt: an unanswered question
            lease_expires_at=None,
            published_at=None,
            next_attempt_at=now + delay,
            in_doubt_since=func.coalesce(Message.in_doubt_since, claim.doubt_since or now),
            error_code="in-doubt",
            error_message=f"{error.code}: {error.message}",
            updated_at=now,
        )
    )
    log.warning("send.in_doubt", lookup_in=delay.total_seconds(), error=str(error))
    return delay


def clear_doubt(session: Session, claim: Claim) -> Claim:
    """The provider provably does not have the message: no longer in doubt."""
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid)
        .values(in_doubt_since=None, updated_at=Message.updated_at)
    )
    return replace(claim, in_doubt=False, doubt_since=None)


def record_in_doubt(session: Session, claim: Claim, error: ProviderError, now: datetime) -> None:
    """A call that may have reached a provider that can neither be searched nor deduplicates:
    never sent again. A receipt may still settle it; otherwise it ends `unknown`."""
    apply_status(
        session,
        claim.sid,
        StatusReport(
            MessageStatus.IN_DOUBT,
            source="worker",
            provider=claim.provider,
            error_code="in-doubt",
            error_message=f"{error.code}: {error.message}",
        ),
        now,
    )
    session.execute(
        update(Message)
        .where(Message.sid == claim.sid, Message.in_doubt_since.is_(None))
        .values(in_doubt_since=claim.doubt_since or now, updated_at=now)
    )


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
        where += [
            or_(Message.published_at.is_(None), Message.published_at < unchanged_since),
            Message.updated_at <= unchanged_since,
        ]
    session.execute(
        update(Message)
        .where(*where)
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )


def due_for_publish(session: Session, settings: Settings, now: datetime) -> list[str]:
    """What the sweeper must (re-)publish; publishing marks them, so the next sweep skips them.

    - committed but not on the queue (the API died between commit and publish, the broker was
      down, a retry waiting in the database, or the broker lost it: see `note_broker_epoch`),
      once its time has come;
    - claimed by a worker whose lease ran out (the worker died mid-send), once.

    A message on the queue is never published again because it waits long: a backlog of any
    length stays as it is."""
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
                    Message.status == MessageStatus.SENDING.value,
                    Message.lease_expires_at <= now,
                    # Not yet re-published since the lease ran out.
                    or_(
                        Message.published_at.is_(None),
                        Message.published_at < Message.lease_expires_at,
                    ),
                ),
            )
        )
        .order_by(Message.created_at)
        .limit(settings.sweep_batch_size)
    )
    # Two overlapping sweeps may pick the same rows; the duplicate tasks lose the claim.
    return list(session.scalars(query))


def note_broker_epoch(session: Session, epoch: str, born: datetime, now: datetime) -> int:
    """Compare the broker's epoch with the one last seen; returns how many messages must be
    published again because the broker lost them (0 when it is the same broker state).

    The epoch is a key the sweeper keeps in Redis: a Redis that restarted empty has lost it,
    and every task it held. Messages published before the new epoch was born and not yet
    claimed are unmarked, so the sweeper publishes each once more, in batches."""
    state = session.get(OutboxState, 1, with_for_update=True)
    if state is None:
        # A new installation: nothing published before can have been lost to it.
        session.add(OutboxState(id=1, broker_epoch=epoch, updated_at=now))
        return 0
    if state.broker_epoch == epoch:
        return 0
    count = _unmark_published_before(session, born)
    state.broker_epoch = epoch
    state.updated_at = now
    log.warning("sweep.broker_lost", epoch=epoch, republish=count)
    return count


def note_lost_in_flight(session: Session, cutoff: datetime) -> int:
    """Queued messages published before `cutoff` and never claimed: no broker copy of them is
    left (a worker died between taking a task and recording it unacked, a Redis that kept its
    data but not that). Unmarked, so the sweeper publishes each once more; returns how many.

    The caller picks `cutoff` so that it cannot touch a backlog: before the oldest task still
    on the queue (the queue is first in, first out) and older than anything a live worker may
    still hold unacknowledged."""
    count = _unmark_published_before(session, cutoff)
    if count:
        log.warning("sweep.lost_in_flight", republish=count)
    return count


def _unmark_published_before(session: Session, before: datetime) -> int:
    """Queued messages published before `before`, made due for the sweeper again."""
    result = session.execute(
        update(Message)
        .where(
            Message.status == MessageStatus.QUEUED.value,
            Message.published_at.is_not(None),
            Message.published_at < before,
        )
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def provider_ids_taken(session: Session, claim: Claim, since: datetime) -> frozenset[str]:
    """Provider ids our other messages to the same number from the same sender already hold:
    a lookup of a message in doubt must not take one of them for its own (their texts may be
    identical)."""
    return frozenset(
        session.scalars(
            select(Message.provider_message_id).where(
                Message.provider_account_id == claim.provider_account_id,
                Message.to_number == claim.to_number,
                Message.from_number == claim.from_number,
                Message.sid != claim.sid,
                Message.provider_message_id.is_not(None),
                Message.created_at >= since - timedelta(days=1),
            )
        )
    )


def published_at_of(session: Session, sid: str) -> datetime | None:
    return session.scalar(select(Message.published_at).where(Message.sid == sid))


@dataclass(frozen=True, slots=True)
class Silent:
    """A message the provider took (or may have) that never got a final word."""

    sid: str
    status: MessageStatus
    provider: str
    provider_account_id: int
    credentials: dict[str, Any]
    provider_message_id: str | None
    since: datetime


# How many silent messages one sweep asks about: each is a provider call, and the sweep must
# stay short; the rest wait for the next sweep.
RECONCILE_BATCH = 100


def silent_messages(session: Session, settings: Settings, now: datetime) -> list[Silent]:
    """`sent` or `in_doubt` messages with no word from the provider for SMSD_RECONCILE_AFTER
    and not asked about since: the reconciler's work, oldest first.

    Taken: marked asked (`reconciled_at`) in the same statement, with rows another sweep is
    taking skipped, so overlapping sweeps never ask about one message twice."""
    due = (
        select(Message.sid)
        .where(
            Message.status.in_([MessageStatus.SENT.value, MessageStatus.IN_DOUBT.value]),
            Message.updated_at <= now - settings.reconcile_after,
            or_(
                Message.reconciled_at.is_(None),
                Message.reconciled_at <= now - settings.reconcile_after,
            ),
        )
        .order_by(Message.updated_at)
        .limit(RECONCILE_BATCH)
        .with_for_update(skip_locked=True)
    )
    sids = list(session.scalars(due))
    if not sids:
        return []
    session.execute(
        update(Message)
        .where(Message.sid.in_(sids))
        # Asking is not news from the provider: the silence still counts from before.
        .values(reconciled_at=now, updated_at=Message.updated_at)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(
        select(
            Message.sid,
            Message.status,
            Message.provider_message_id,
            Message.updated_at,
            Message.sent_at,
            ProviderAccount.id,
            ProviderAccount.provider,
            ProviderAccount.credentials,
        )
        .join(ProviderAccount, ProviderAccount.id == Message.provider_account_id)
        .where(Message.sid.in_(sids))
        .order_by(Message.updated_at)
    ).all()
    return [
        Silent(
            sid=row.sid,
            status=MessageStatus(row.status),
            provider=row.provider,
            provider_account_id=row.id,
            credentials=dict(row.credentials or {}),
            provider_message_id=row.provider_message_id,
            since=row.sent_at or row.updated_at,
        )
        for row in rows
    ]


def record_reconciled(
    session: Session,
    silent: Silent,
    status: MessageStatus | None,
    provider_status: str | None,
    settings: Settings,
    now: datetime,
) -> MessageStatus | None:
    """What asking the provider gave (`status`, None when it could not be asked or said
    nothing new); past the receipt window a message with no final word ends `unknown`.
    Returns the status applied, if any."""
    report: StatusReport | None = None
    if status is not None and status.rank > silent.status.rank:
        report = StatusReport(
            status,
            source="reconcile",
            provider=silent.provider,
            provider_status=provider_status,
            provider_message_id=silent.provider_message_id,
        )
    elif silent.since <= now - settings.receipt_window:
        report = StatusReport(
            MessageStatus.UNKNOWN,
            source="reconcile",
            provider=silent.provider,
            provider_status=provider_status,
            error_code="no-receipt",
            error_message="no final status from the provider within SMSD_RECEIPT_WINDOW",
        )
    if report is None:
        return None
    applied = apply_status(session, silent.sid, report, now)
    return report.status if applied else None
