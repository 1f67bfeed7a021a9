"""Bulk send: one request, up to SMSD_BULK_MAX_RECIPIENTS recipients of one campaign.

The request is checked as a single send is (credentials, environment, campaign, provider)
and refused whole with the single send's answer if that fails. Then every recipient row is
checked with the single send's rules, in the order they came; a row that fails is reported
(its number, the parameter, the single send's text) and the others are stored. Everything
is written in one transaction: the batch's record, then its messages in chunks. The caller
commits and only then answers 202; nobody publishes the batch as such: the bulk pump
(shared/messages/lanes.py) puts its messages on the bulk lane's queue a window at a time, in
its tenant's turn. A batch is stored whole or not at all, and never on a queue before it is
committed.

Rows arrive as an iterator (api/bulk.py reads them from the spooled body as they are
needed) and are written a chunk at a time: memory holds one chunk and the rejections,
however large the body."""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.accounts.access import resolve_provider_account
from shared.calls.links import CODE_LENGTH, short_url, shorten
from shared.calls.tokens import TokenRef, find_tokens
from shared.core.errors import (
    IdempotencyConflict,
    InvalidParameter,
    RequestRefused,
    TooManyRecipients,
)
from shared.core.models import BulkBatch, Campaign, Message, MessageStatus
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.accept import (
    SendSmsCommand,
    additional_params,
    authenticated_account,
    chosen_sender,
    params_made_it_long,
    scheduled_for,
    status_callback_for,
    usable_campaign,
    usable_token,
)
from shared.text.phone import Checking, NumberPool
from shared.text.rendering import build_link, render_text
from shared.text.segments import measure

log = structlog.get_logger(__name__)

# Rows checked and written together: one token lookup and one COPY (or INSERT) per chunk.
CHUNK = 2000
# How long a retry waits for a twin with its Idempotency-Key that is still storing its batch.
KEY_WAIT = timedelta(minutes=2)


def new_batch_id() -> str:
    """`BB` + 32 lowercase hex digits: a messageSid's shape, told apart by its prefix."""
    return "BB" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class BulkRow:
    """One recipient as the edge read it. `invalid` names a field it could not read."""

    number: int
    caller_id: str | None = None
    additional_params: str | None = None
    jp_token: str | None = None
    sender: str | None = None
    invalid: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    row: int
    parameter: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row, "parameter": self.parameter, "error": self.error}


@dataclass(slots=True)
class BulkAnswer:
    batch_id: str
    campaign_id: str
    accepted: int
    rejected: list[dict[str, Any]]
    replayed: bool = False


def accept_bulk(
    session: Session,
    header: SendSmsCommand,
    fingerprint: str,
    rows: Iterable[BulkRow],
    settings: Settings,
    now: datetime,
    numbers: NumberPool | None = None,
) -> BulkAnswer:
    """Check and store one bulk request in the session's transaction (see the module).
    `numbers` validates the recipients' numbers in other processes, a chunk ahead of the one
    being stored; without it they are checked here."""
    account = authenticated_account(session, header)
    key = header.idempotency_key
    if key:
        earlier = _batch_by_key(session, account.id, key)
        if earlier is not None:
            return _replay(earlier, fingerprint)
    campaign = usable_campaign(session, account, header.environment_name, header.campaign_id, now)
    provider_account = resolve_provider_account(session, account, now)
    scheduled = scheduled_for(header.send_at, settings, now)
    callback = status_callback_for(header.status_callback, campaign, settings)
    batch_id = new_batch_id()
    if not _claim_batch(
        session, batch_id, account.id, campaign, key, fingerprint, now, header.status_callback
    ):
        # A concurrent twin with this key committed first (the insert waited for it).
        twin = _batch_by_key(session, account.id, key or "")
        if twin is None:
            raise RuntimeError("a bulk Idempotency-Key insert lost to a twin that cannot be found")
        return _replay(twin, fingerprint)
    recipients = _Recipients(
        session,
        account.id,
        campaign,
        provider_account,
        batch_id,
        scheduled,
        callback,
        settings,
        now,
    )
    accepted = 0
    rejected: list[dict[str, Any]] = []
    seen = 0
    remaining = iter(rows)
    pool = numbers or NumberPool(0)
    region = settings.default_region

    def read() -> tuple[list[BulkRow], list[str | None], Checking]:
        nonlocal seen
        chunk = list(islice(remaining, CHUNK))
        seen += len(chunk)
        if seen > settings.bulk_max_recipients:
            raise TooManyRecipients(settings.bulk_max_recipients)
        raws = [None if row.invalid else row.caller_id for row in chunk]
        return chunk, raws, pool.submit(raws, region)

    # Three things at once, on PostgreSQL: the next chunk's numbers are validated (in the
    # pool's process) and the previous chunk is COPYed (on a thread, mostly waiting for
    # PostgreSQL) while this one is checked and rendered.
    write = queries.bulk_writer(session)
    with ThreadPoolExecutor(1, thread_name_prefix="bulk-copy") as copier:
        copying: Future[None] | None = None
        chunk, raws, checked = read()
        while chunk:
            ahead = read()
            e164 = pool.result(checked, raws, region)
            if copying is not None and recipients.uses_session(chunk):
                copying.result()  # the session's connection is the COPY's until it ends
            messages = recipients.check(chunk, rejected, e164)
            if copying is not None:
                copying.result()  # one COPY at a time, in order
            if write.concurrent:
                copying = copier.submit(write, messages)
            else:
                write(messages)
            accepted += len(messages)
            chunk, raws, checked = ahead
        if copying is not None:
            copying.result()
    session.execute(
        update(BulkBatch)
        .where(BulkBatch.id == batch_id)
        .values(accepted=accepted, rejected=rejected)
    )
    log.info(
        "bulk.accepted",
        batchId=batch_id,
        campaign=campaign.campaign_id,
        accepted=accepted,
        rejected=len(rejected),
    )
    return BulkAnswer(batch_id, campaign.campaign_id, accepted, rejected)


class _Recipients:
    """The single send's per-message checks and rendering, for the rows of one campaign."""

    def __init__(
        self,
        session: Session,
        account_id: int,
        campaign: Campaign,
        provider_account: Any,
        batch_id: str,
        scheduled: datetime | None,
        status_callback: str | None,
        settings: Settings,
        now: datetime,
    ) -> None:
        self.session = session
        self.account_id = account_id
        self.campaign = campaign
        self.provider_account = provider_account
        self.batch_id = batch_id
        self.scheduled = scheduled
        self.settings = settings
        self.now = now
        # Validity counts from when the batch may be sent (its sendAt, if later).
        self.expires_at = (scheduled or now) + settings.message_validity
        # Where each message's status changes go (the batch's, else the campaign's).
        self.status_callback = status_callback
        self.sids: Iterator[str] = iter(())
        # Many recipients get the same text (no link, or no parameters): measured once.
        self.measure = functools.lru_cache(maxsize=1024)(measure)

    def uses_session(self, chunk: Sequence[BulkRow]) -> bool:
        """Whether checking `chunk` reads or writes the database (its rows' jpTokens, the
        campaign's short links)."""
        return bool(self.campaign.link_url and self.campaign.shorten_links) or any(
            row.jp_token for row in chunk
        )

    def check(
        self,
        chunk: Sequence[BulkRow],
        rejected: list[dict[str, Any]],
        numbers: Sequence[str | None],
    ) -> list[dict[str, Any]]:
        """The chunk's rows as messages to store, its refusals added to `rejected`; `numbers`
        are its callerIds in E.164 (None: not a valid number), in its order."""
        campaign = self.campaign
        wanted = [
            (campaign.account_id, campaign.environment_id, row.jp_token)
            for row in chunk
            if row.jp_token and not row.invalid
        ]
        tokens = find_tokens(self.session, wanted)
        messages: list[dict[str, Any]] = []
        # The chunk's messageSids from one read of the OS's randomness, not one each (a
        # uuid4 is a system call: a tenth of the thread's time per recipient).
        random = os.urandom(16 * len(chunk)).hex()
        self.sids = iter(["SM" + random[i : i + 32] for i in range(0, len(random), 32)])
        for row, number in zip(chunk, numbers, strict=True):
            try:
                messages.append(self._message(row, number, tokens))
            except RequestRefused as refused:
                # Only a jpToken past its time is refused without naming a parameter.
                parameter = getattr(refused, "parameter", "jpToken")
                rejected.append(Rejection(row.number, parameter, refused.text).as_json())
        return messages

    def _message(
        self, row: BulkRow, to_number: str | None, tokens: dict[tuple[int, int, str], TokenRef]
    ) -> dict[str, Any]:
        if row.invalid:
            raise InvalidParameter(row.invalid)
        if to_number is None:
            raise InvalidParameter("callerId")  # as `caller_number` would have
        campaign, settings, now = self.campaign, self.settings, self.now
        token = usable_token(campaign, row.jp_token, tokens, now, required=False)
        params = additional_params(row.additional_params)
        sender = chosen_sender(row.sender, self.provider_account.sender_ids, settings)
        link = (
            build_link(campaign.link_url, params, token.token if token else None)
            if campaign.link_url
            else None
        )
        if link and campaign.shorten_links:
            # Checked with a stand-in of the short link's length first, so that a row refused
            # for its length leaves no link behind (and needs no savepoint per row).
            self._render(row, token, params, short_url(settings, "x" * CODE_LENGTH))
            body = self._render(row, token, params, self._short(link, token))
        else:
            body = self._render(row, token, params, link)
        size = self.measure(body)
        return {
            "sid": next(self.sids),
            "account_id": self.account_id,
            "environment_id": campaign.environment_id,
            "campaign_pk": campaign.id,
            "campaign_id": campaign.campaign_id,
            "token_id": token.id if token else None,
            "to_number": to_number,
            "from_number": sender,
            "body": body,
            "segments": size.segments,
            "encoding": size.encoding,
            "status": MessageStatus.QUEUED.value,
            "provider": self.provider_account.provider,
            "provider_account_id": self.provider_account.id,
            "batch_id": self.batch_id,
            "idempotency_key": None,
            "request_fingerprint": None,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "expires_at": self.expires_at,
            # Due at once, or at the batch's sendAt: the bulk pump publishes it then, in its
            # tenant's turn.
            "next_attempt_at": self.scheduled,
            "status_callback": self.status_callback,
        }

    def _short(self, link: str, token: TokenRef | None) -> str:
        return shorten(
            self.session,
            self.account_id,
            link,
            token.id if token else None,
            self.settings,
            self.now,
            sent_at=self.scheduled,
        )

    def _render(
        self, row: BulkRow, token: TokenRef | None, params: list[tuple[str, str]], shown: str | None
    ) -> str:
        body = render_text(self.campaign.message_text, shown)
        if self.measure(body).segments > self.campaign.max_segments:
            # As the single send: the parameters are to blame only if the text fits without.
            raise InvalidParameter(
                "additionalParams"
                if params_made_it_long(self.campaign, token, params)
                else "campaignId"
            )
        return body


def _claim_batch(
    session: Session,
    batch_id: str,
    account_id: int,
    campaign: Campaign,
    key: str | None,
    fingerprint: str,
    now: datetime,
    status_callback: str | None,
) -> bool:
    """Insert the batch's record; False if a twin holds its Idempotency-Key. A twin still
    storing its batch holds the key until it commits: on PostgreSQL this insert waits for it
    (up to KEY_WAIT) instead of the usual lock and statement timeouts, which a large
    batch outlasts, so the retry gets the twin's answer rather than a 503."""
    on_postgres = session.get_bind().dialect.name == "postgresql"
    dialect = postgresql if on_postgres else sqlite
    statement = (
        dialect.insert(BulkBatch)
        .values(
            id=batch_id,
            account_id=account_id,
            environment_id=campaign.environment_id,
            campaign_pk=campaign.id,
            campaign_id=campaign.campaign_id,
            accepted=0,
            rejected=[],
            idempotency_key=key,
            request_fingerprint=fingerprint if key else None,
            created_at=now,
            status_callback=status_callback,
        )
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(BulkBatch.id)
    )
    if not (on_postgres and key):
        return session.execute(statement).scalar_one_or_none() is not None
    before = queries.transaction_timeouts(session)
    wait = f"{int(KEY_WAIT.total_seconds() * 1000)}ms"
    queries.set_transaction_timeouts(session, wait, wait)
    # Restored once the insert is through (an error ends the transaction: nothing to restore).
    claimed = session.execute(statement).scalar_one_or_none() is not None
    queries.set_transaction_timeouts(session, *before)
    return claimed


def _batch_by_key(session: Session, account_id: int, key: str) -> BulkBatch | None:
    return session.scalars(
        select(BulkBatch).where(
            BulkBatch.account_id == account_id, BulkBatch.idempotency_key == key
        )
    ).one_or_none()


def _replay(batch: BulkBatch, fingerprint: str) -> BulkAnswer:
    if batch.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    log.info("bulk.replayed", batchId=batch.id)
    return BulkAnswer(
        batch.id, batch.campaign_id, batch.accepted, list(batch.rejected), replayed=True
    )


# Progress and cancellation

# How each status counts in a batch's progress.
PROGRESS_OF = {
    MessageStatus.QUEUED: "queued",
    MessageStatus.SENDING: "queued",
    MessageStatus.SENT: "sent",
    MessageStatus.IN_DOUBT: "sent",
    MessageStatus.DELIVERED: "delivered",
    MessageStatus.UNDELIVERED: "failed",
    MessageStatus.FAILED: "failed",
    MessageStatus.REJECTED: "failed",
    MessageStatus.UNKNOWN: "failed",
    MessageStatus.OPTED_OUT: "optedOut",
    MessageStatus.EXPIRED: "expired",
    MessageStatus.CANCELLED: "cancelled",
}
PROGRESS_KEYS = ("queued", "sent", "delivered", "failed", "optedOut", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class BatchProgress:
    batch: BulkBatch
    counts: dict[str, int]


def batch_of(
    session: Session, account_id: int, campaign_id: str, batch_id: str
) -> BulkBatch | None:
    """The account's batch of that campaign; another account's (or campaign's) is as absent as
    one that never was."""
    return session.scalars(
        select(BulkBatch).where(
            BulkBatch.id == batch_id,
            BulkBatch.account_id == account_id,
            BulkBatch.campaign_id == campaign_id,
        )
    ).one_or_none()


def batch_progress(session: Session, batch: BulkBatch) -> BatchProgress:
    counts = dict.fromkeys(PROGRESS_KEYS, 0)
    rows = session.execute(
        select(Message.status, func.count())
        .where(Message.batch_id == batch.id)
        .group_by(Message.status)
    )
    for status, count in rows:
        counts[PROGRESS_OF.get(MessageStatus(status), "failed")] += count
    return BatchProgress(batch, counts)


def cancel_batch(session: Session, batch: BulkBatch, now: datetime) -> int:
    """Withdraw the batch's messages no worker has taken yet; returns how many. A worker's
    claim takes only queued messages, and the row lock orders the two: a message is either
    claimed (and sent) or cancelled, never both."""
    cancelled = queries.cancel_queued_in_batch(session, batch.id, now)
    if batch.cancelled_at is None:
        batch.cancelled_at = now
    log.info("bulk.cancelled", batchId=batch.id, cancelled=cancelled)
    return cancelled


def refresh_statistics(session: Session, accepted: int) -> bool:
    """After a batch committed: PostgreSQL's statistics of `messages` refreshed if the batch
    changed its size much (`queries.refresh_statistics_after_bulk`); whether they were."""
    return queries.refresh_statistics_after_bulk(session, accepted)
