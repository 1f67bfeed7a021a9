"""The worker's side of a message: claim it, then record what the provider said.

A claim is a conditional UPDATE: of any number of copies of a send task (broker redelivery,
sweeper re-publish, a retried publish) exactly one wins it, so none sends twice. What each
step writes is in shared/messages/queries.py; what to write, and when, is decided here."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.orm import Session

from shared.core.models import Message, MessageStatus, ProviderAccount
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.lifecycle import StatusReport, apply_status, record_parts, sent_from_sending
from shared.messages.optout import is_opted_out
from shared.providers.interface import ProviderError
from shared.providers.rate_limits import Rate
from shared.text.phone import normalise_sender

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
    # Its bulk batch (None for a single send): handed back, the bulk pump publishes it again.
    batch_id: str | None = None

    def rates(self) -> list[Rate]:
        """The throughput limits this send counts against (in segments per second)."""
        limits = []
        if self.sender_rate:
            limits.append(Rate(f"{self.provider_account_id}:{self.from_number}", self.sender_rate))
        if self.account_rate:
            limits.append(Rate(f"{self.provider_account_id}", self.account_rate))
        return limits


@dataclass(frozen=True, slots=True)
class NotClaimed:
    """Why a claim sends nothing. `ended`: the claim itself ended the message (expired, opted
    out, out of attempts); None: there was nothing to do (sent already, another worker holds
    it, unknown sid), as for every extra copy of a task."""

    ended: MessageStatus | None = None
    provider: str | None = None


def take(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | NotClaimed:
    """Take the message for sending, or say why it is not ours to send (now or ever)."""
    if session.get_bind().dialect.name == "postgresql":
        fast = _take_queued(session, sid, settings, now)
        if fast is not None:
            return fast
    # Everything else (already taken, a dead worker's lease, expired, opted out, unknown), and
    # every claim on SQLite, which cannot return another table's columns from an UPDATE.
    return _take_any(session, sid, settings, now)


def claim(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    """`take`, for callers that only need the claim."""
    taken = take(session, sid, settings, now)
    return taken if isinstance(taken, Claim) else None


def _take_queued(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | None:
    """The common case in one statement; None for `_take_any` to judge."""
    row = queries.take_queued(session, sid, now, now + settings.send_lease)
    if row is None:
        return None
    structlog.contextvars.bind_contextvars(account=row.tenant_id, campaign=row.campaign_id)
    return _claim_of_row(row, settings)


def take_batch(
    session: Session, sids: Sequence[str], settings: Settings, now: datetime
) -> dict[str, Claim]:
    """`take` for a batch, the common case in one statement (PostgreSQL): the claims of the
    queued messages it took, by sid. The others, and every sid on SQLite, are for `take` to
    judge one by one (already taken, a dead worker's lease, expired, opted out, unknown)."""
    if not sids or session.get_bind().dialect.name != "postgresql":
        return {}
    rows = queries.take_queued_batch(session, sids, now, now + settings.send_lease)
    return {row.sid: _claim_of_row(row, settings) for row in rows}


def _claim_of_row(row: Any, settings: Settings) -> Claim:
    """The claim a one-statement claim (`queries.take_queued`, `take_queued_batch`) read back."""
    return Claim(
        sid=row.sid,
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
        batch_id=row.batch_id,
    )


def _take_any(session: Session, sid: str, settings: Settings, now: datetime) -> Claim | NotClaimed:
    found = queries.message_for_claim(session, sid)
    if found is None:
        log.warning("send.unknown_message")
        return NotClaimed()
    message, provider_account, tenant_id, account_max_attempts = found
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
        return NotClaimed()
    ending: tuple[MessageStatus, str | None, str] | None = None
    if status is MessageStatus.SENDING and message.attempts >= max_attempts:
        # Workers keep dying on this one (a poison message?): stop instead of looping forever.
        ending = (
            MessageStatus.FAILED,
            "attempts-exhausted",
            "the worker sending it was lost on every attempt",
        )
    elif message.expires_at <= now:
        ending = (MessageStatus.EXPIRED, None, "not sent within its validity period")
    elif is_opted_out(session, provider_account.account_id, message.from_number, message.to_number):
        ending = (
            MessageStatus.OPTED_OUT,
            "opted-out",
            "the recipient opted out of this sender",
        )
    if ending is not None:
        ended, code, text_ = ending
        applied = apply_status(
            session,
            sid,
            StatusReport(ended, source="worker", error_code=code, error_message=text_),
            now,
        )
        return NotClaimed(ended if applied else None, message.provider)
    lease = now + settings.send_lease
    if not queries.take_as_read(session, sid, message.status, message.attempts, now, lease):
        log.info("send.claim_lost")
        return NotClaimed()
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
        batch_id=message.batch_id,
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
    usable = [
        c
        for c in queries.provider_accounts_in_order(session, owned.owner_id)
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
    message = queries.move_to_provider(
        session, owned.sid, owned.provider_account_id, following, sender, now
    )
    if message is None:
        return None
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
    queries.hand_back(
        session,
        owned.sid,
        {"attempts": Message.attempts - 1, "next_attempt_at": now + delay},
        now,
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
    apply_status(session, claim.sid, report, now)
    # If a delivery receipt overtook us the status did not move, but the id must still be kept.
    queries.keep_provider_message_id(session, claim.sid, provider_message_id)


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
    values: dict[str, Any] = {
        # Counted against the provider that failed; one just failed over to starts clean.
        "provider_failures": Message.provider_failures + (1 if provider_failed else 0),
        "next_attempt_at": now + delay,
        "error_code": error.code,
        "error_message": error.message,
    }
    if in_doubt:
        # An earlier call in doubt stays in doubt until the message is sent or provably
        # absent (`clear_doubt`): it must not move to another provider meanwhile.
        values["in_doubt_since"] = queries.in_doubt_since(claim.doubt_since or now)
    queries.hand_back(session, claim.sid, values, now)
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
    queries.hand_back(
        session,
        claim.sid,
        {
            "attempts": Message.attempts - 1,  # not a failed attempt: an unanswered question
            "next_attempt_at": now + delay,
            "in_doubt_since": queries.in_doubt_since(claim.doubt_since or now),
            "error_code": "in-doubt",
            "error_message": f"{error.code}: {error.message}",
        },
        now,
    )
    log.warning("send.in_doubt", lookup_in=delay.total_seconds(), error=str(error))
    return delay


def clear_doubt(session: Session, claim: Claim) -> Claim:
    """The provider provably does not have the message: no longer in doubt."""
    queries.clear_doubt(session, claim.sid)
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
    queries.note_doubt(session, claim.sid, claim.doubt_since or now, now)


def provider_ids_taken(session: Session, claim: Claim, since: datetime) -> frozenset[str]:
    """Provider ids our other messages to the same number from the same sender already hold:
    a lookup of a message in doubt must not take one of them for its own (their texts may be
    identical)."""
    return queries.provider_ids_near(
        session,
        claim.provider_account_id,
        claim.to_number,
        claim.from_number,
        claim.sid,
        since - timedelta(days=1),
    )
