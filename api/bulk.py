"""Bulk send: up to SMSD_BULK_MAX_RECIPIENTS recipients of one campaign in one request, as a
JSON array or a CSV file; its progress, and its cancellation.

The body is spooled as it arrives (in memory up to SMSD_BULK_SPOOL_BYTES, on disk past it)
and read back a row at a time while the rows are checked and stored
(shared/messages/bulk.py): however large the body, memory holds one chunk of rows."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import hashlib
import io
import json
import re
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import IO, Annotated, Any
from urllib.parse import quote

import anyio
import msgspec
import structlog
from celery import Celery
from litestar import MediaType, Request, Response, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.openapi.spec import Example
from litestar.params import FromPath, QueryParameter
from sqlalchemy.orm import Session

from api.body import JsonBody, rfc3339
from api.dependencies import CeleryDep, DatabaseDep, NumbersDep, SettingsDep, TransactionsDep
from api.headers import (
    MAX_IDEMPOTENCY_KEY,
    V3,
    ApplicationKey,
    EnvironmentName,
    IdempotencyKey,
    TenantId,
)
from api.openapi import (
    BATCH_ERRORS,
    BULK_ACCEPTED,
    BULK_BODIES,
    BULK_ERRORS,
    BULK_PROGRESS,
    documented,
)
from shared.accounts.access import authenticate
from shared.core.db import Database
from shared.core.errors import BatchNotFound, BodyTooLarge, InvalidParameter
from shared.core.models import BulkBatch, utcnow
from shared.core.settings import Settings
from shared.messages.accept import SendSmsCommand
from shared.messages.bulk import (
    BatchProgress,
    BulkAnswer,
    BulkRow,
    accept_bulk,
    batch_of,
    batch_progress,
    cancel_batch,
    refresh_statistics,
)
from shared.messages.lanes import BulkPump
from shared.text.callback_urls import shown_url

log = structlog.get_logger(__name__)

BULK = f"{V3}/campaign/sms/{{campaign_id:str}}/bulk"
BATCH = f"{BULK}/{{batch_id:str}}"
# Bytes read back from the spool at a time.
_READ = 64 * 1024
# A JSON row larger than this is not a recipient: the body is refused.
_MAX_ROW = 64 * 1024
_BATCH_ID = re.compile(r"BB[0-9a-f]{32}")
# What may follow a value in an array.
_AFTER_VALUE = frozenset(" \t\r\n,]")


class BulkJson(msgspec.Struct):
    batchId: str  # noqa: N815 - the API's own spelling
    campaignId: str  # noqa: N815
    accepted: int
    rejected: list[dict[str, Any]]


class ProgressJson(msgspec.Struct, omit_defaults=True):
    batchId: str  # noqa: N815
    campaignId: str  # noqa: N815
    createdAt: datetime  # noqa: N815
    cancelledAt: datetime | None  # noqa: N815
    accepted: int
    rejected: int
    queued: int
    sent: int
    delivered: int
    failed: int
    optedOut: int  # noqa: N815
    expired: int
    cancelled: int
    # Where its messages' status changes are POSTed (a password in it hidden); absent: nowhere.
    statusCallback: str | None = None  # noqa: N815


@post(
    BULK,
    summary="Bulk send",
    description=(
        "Queues the campaign's SMS to every recipient of the body: a JSON array of "
        '`{"callerId", "additionalParams"?, "jpToken"?, "from"?}` or, with '
        "`Content-Type: text/csv`, a CSV file whose header row names those columns. Every row "
        "is checked with Send SMS's rules; the valid ones are committed, each as a message with "
        "its own messageSid, before the 202, and the others are listed with their row number "
        "(from 1, a CSV's header not counted), the parameter and Send SMS's error text. A "
        "refusal of the request itself (credentials, environment, campaign) is Send SMS's. "
        "Past the recipient limit nothing is stored and the answer is 413. A row (a JSON "
        "value, a CSV line) longer than 64 KiB makes the body unreadable (400 `body`). With an "
        "Idempotency-Key, a retry gets the first answer again, also while the first is still "
        "being stored (it waits for it)."
    ),
    tags=["Bulk send"],
    operation_class=documented(
        bodies=BULK_BODIES, success=BULK_ACCEPTED, success_status=202, errors=BULK_ERRORS
    ),
    status_code=202,
    # Counted against SMSD_BULK_MAX_BODY_BYTES as the body is spooled, below.
    request_max_body_size=None,
)
async def bulk_send(
    request: Request[object, object, State],
    transactions: TransactionsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    database: DatabaseDep,
    numbers: NumbersDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
    environment_name: EnvironmentName = None,
    idempotency_key: IdempotencyKey = None,
    send_at: Annotated[
        str | None,
        QueryParameter(
            name="sendAt",
            description=(
                "When to send the batch (RFC 3339 with an offset, at most "
                "SMSD_SCHEDULE_HORIZON ahead; a time past or absent: at once). Each message's "
                "validity counts from then; cancelling the batch cancels them."
            ),
            examples=[Example(value="2026-12-24T09:00:00+01:00")],
        ),
    ] = None,
    status_callback: Annotated[
        str | None,
        QueryParameter(
            name="statusCallback",
            description=(
                "Where to POST each message's status changes (http or https; see the README's "
                "Status callbacks). Else the campaign's, if it has one."
            ),
            examples=[Example(value="https://example.com/sms/status")],
        ),
    ] = None,
) -> Response[object]:
    media = (request.headers.get("content-type") or "").partition(";")[0]
    as_csv = media.strip().lower() == "text/csv"
    invalid = None
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        invalid = "Idempotency-Key"
    # When to send the whole batch (`?sendAt=`, RFC 3339), if not at once.
    when = None
    if send_at is not None:
        # An offset's "+" not percent-encoded in the query arrives as a space: read it as meant.
        when = rfc3339(send_at.strip().replace(" ", "+"))
        invalid = invalid or (None if when else "sendAt")
    header = SendSmsCommand(
        account_in_url=account_id,
        tenant_id=tenant_id,
        application_key=application_key,
        environment_name=environment_name,
        campaign_id=campaign_id,
        caller_id=None,
        invalid_parameter=invalid,
        idempotency_key=idempotency_key,
        send_at=when,
        status_callback=(status_callback or "").strip() or None,
    )
    # Who asks is known before a byte of the body is stored: a stranger's 64 MiB costs nothing.
    await transactions.run_unbounded(
        lambda session: authenticate(session, account_id, tenant_id, application_key)
    )
    with tempfile.SpooledTemporaryFile(max_size=settings.bulk_spool_bytes) as spool:
        digest = await _spool(request, spool, settings.bulk_max_body_bytes)
        # sendAt only when given: a batch without one keeps the fingerprint it always had.
        scheduled = f"\n{when.isoformat()}" if when else ""
        # Likewise the statusCallback.
        callback = f"\ncallback {header.status_callback}" if header.status_callback else ""
        fingerprint = hashlib.sha256(
            f"{campaign_id}\n{environment_name}\n{as_csv}\n{digest}{scheduled}{callback}".encode()
        ).hexdigest()

        def store(session: Session) -> BulkAnswer:
            spool.seek(0)
            rows = csv_rows(spool) if as_csv else json_rows(spool)
            return accept_bulk(session, header, fingerprint, rows, settings, utcnow(), numbers)

        async with _storing(settings.bulk_concurrency):
            answer = await transactions.run_unbounded(store)
    body = BulkJson(answer.batch_id, answer.campaign_id, answer.accepted, answer.rejected)
    # Quoted: an id with a space or a non-ASCII letter must not fail the answer of a batch
    # already committed.
    location = f"{V3}/campaign/sms/{quote(campaign_id, safe='')}/bulk/{answer.batch_id}"
    headers = {"Location": location.replace("{account_id:str}", quote(account_id, safe=""))}
    if answer.replayed:
        headers["Idempotency-Replay"] = "true"
    return Response(
        body,
        status_code=202,
        media_type=MediaType.JSON,
        headers=headers,
        background=BackgroundTask(_after_202, celery, database, settings, answer.accepted)
        if answer.accepted and not answer.replayed
        else None,
    )


# Per event loop (one per API process; the tests run several), created on first use.
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _storing(concurrency: int) -> AsyncIterator[None]:
    """At most `concurrency` bulk requests of this process store at once; the others wait for
    their turn on the event loop, holding no thread and no connection."""
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns[loop] = asyncio.Semaphore(concurrency)
    async with turn:
        yield


async def _spool(request: Request[Any, Any, Any], spool: IO[bytes], limit: int) -> str:
    """The body into `spool`, refused with 413 past `limit` bytes; its SHA-256."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        digest.update(chunk)
        spool.write(chunk)
    return digest.hexdigest()


async def _after_202(celery: Celery, db: Database, settings: Settings, accepted: int) -> None:
    """After the 202: PostgreSQL's statistics brought up to date if the batch changed the
    table's size much (`refresh_statistics`), then the bulk lane started on
    the new batch at once rather than at the next sweep. A failure of either loses nothing:
    the batch is committed, autovacuum analyzes later, and the workers' pump finds it."""

    def analyze() -> None:
        with db.transaction() as session:
            if refresh_statistics(session, accepted):
                log.info("bulk.analyzed", accepted=accepted)

    try:
        await anyio.to_thread.run_sync(analyze)
    except Exception:
        log.exception("bulk.analyze_failed")
    pump = _pumps.get(db)
    if pump is None:
        # One per process (per database: the tests run several apps), so its limiter is too.
        pump = _pumps[db] = BulkPump(celery, db, settings)
    try:
        await anyio.to_thread.run_sync(pump.pump)
    except Exception:
        log.exception("bulk.pump_failed")


_pumps: weakref.WeakKeyDictionary[Database, BulkPump] = weakref.WeakKeyDictionary()


@get(
    BATCH,
    summary="Bulk send progress",
    description=(
        "How many of a bulk batch's messages are queued (not sent yet), sent, delivered, "
        "failed, opted out, expired and cancelled, with the accepted and rejected counts."
    ),
    tags=["Bulk send"],
    operation_class=documented(success=BULK_PROGRESS, errors=BATCH_ERRORS),
)
async def bulk_progress(
    transactions: TransactionsDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    batch_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
) -> ProgressJson:
    def load(session: Session) -> BatchProgress:
        batch = _batch(session, account_id, tenant_id, application_key, campaign_id, batch_id)
        return batch_progress(session, batch)

    return _progress_json(await transactions.run_unbounded(load))


@delete(
    BATCH,
    summary="Cancel a bulk send",
    description=(
        "Cancels every message of the batch that no worker has taken yet (they end "
        "`cancelled`); messages already taken are sent as usual. Answers the progress after."
    ),
    tags=["Bulk send"],
    operation_class=documented(success=BULK_PROGRESS, errors=BATCH_ERRORS),
    status_code=200,
)
async def bulk_cancel(
    transactions: TransactionsDep,
    account_id: FromPath[str],
    campaign_id: FromPath[str],
    batch_id: FromPath[str],
    tenant_id: TenantId = None,
    application_key: ApplicationKey = None,
) -> ProgressJson:
    def withdraw(session: Session) -> BatchProgress:
        batch = _batch(session, account_id, tenant_id, application_key, campaign_id, batch_id)
        cancel_batch(session, batch, utcnow())
        return batch_progress(session, batch)

    return _progress_json(await transactions.run_unbounded(withdraw))


def _batch(
    session: Session,
    account_id: str,
    tenant_id: str | None,
    application_key: str | None,
    campaign_id: str,
    batch_id: str,
) -> BulkBatch:
    """The caller's batch, or 404 (another account's batch is as absent as an unknown one)."""
    account = authenticate(session, account_id, tenant_id, application_key)
    # Not a batch id (or a campaign id no database can hold): no such batch, without a query.
    if not _BATCH_ID.fullmatch(batch_id) or "\x00" in campaign_id:
        raise BatchNotFound(batch_id)
    batch = batch_of(session, account.id, campaign_id, batch_id)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


def _progress_json(progress: BatchProgress) -> ProgressJson:
    batch, counts = progress.batch, progress.counts
    return ProgressJson(
        batchId=batch.id,
        campaignId=batch.campaign_id,
        createdAt=batch.created_at,
        cancelledAt=batch.cancelled_at,
        accepted=batch.accepted,
        rejected=len(batch.rejected),
        **counts,
        statusCallback=shown_url(batch.status_callback) if batch.status_callback else None,
    )


# Reading the rows


def _row(number: int, body: JsonBody) -> BulkRow:
    return BulkRow(
        number=number,
        caller_id=body.text("callerId", allow_number=True),
        additional_params=body.text("additionalParams"),
        jp_token=body.text("jpToken"),
        sender=body.text("from", allow_number=True),
        invalid=body.invalid,
    )


def json_rows(stream: IO[bytes], read_size: int = _READ) -> Iterator[BulkRow]:
    """The rows of a JSON array, read a piece at a time. A body that is not one array, or is
    not UTF-8 JSON, is the request's 400 `body`; a row that is JSON but not an object is that
    row's."""
    for number, decoded in enumerate(JsonArray(stream, read_size).items(), start=1):
        yield _row(number, JsonBody.of(decoded))


class JsonArray:
    """The values of a top-level JSON array, each decoded by the json module's scanner as
    soon as enough of the body is read that it cannot be a truncated one."""

    def __init__(self, stream: IO[bytes], read_size: int = _READ) -> None:
        self._stream = stream
        self._read_size = read_size
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self._scan = json.JSONDecoder().raw_decode
        self._text = ""
        self._pos = 0
        self._ended = False

    def items(self) -> Iterator[Any]:
        if self._next_char() != "[":
            raise InvalidParameter("body")
        self._pos += 1
        if self._next_char() == "]":
            self._pos += 1
        else:
            while True:
                yield self._value()
                separator = self._next_char()
                self._pos += 1
                if separator == "]":
                    break
                if separator != ",":
                    raise InvalidParameter("body")
        if self._next_char() != "":
            raise InvalidParameter("body")  # something after the array

    def _more(self) -> bool:
        """Read the next piece of the body; False at its end."""
        if self._ended:
            return False
        chunk = self._stream.read(self._read_size)
        try:
            piece = self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise InvalidParameter("body") from None
        self._ended = not chunk
        self._text, self._pos = self._text[self._pos :] + piece, 0
        return True

    def _next_char(self) -> str:
        """The next character that is not whitespace (left at `_pos`), or "" at the end."""
        while True:
            text, pos = self._text, self._pos
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            self._pos = pos
            if pos < len(text):
                return text[pos]
            if not self._more():
                return ""

    def _value(self) -> Any:
        # A number is whole only when what follows it may follow a value ("12" may be "123",
        # "-1.5" may be "-1.5e3"): until then more of the body is read, unless it ends there.
        self._next_char()
        while True:
            try:
                value, end = self._scan(self._text, self._pos)
            except (ValueError, RecursionError):
                # Cut short, or never a row: too deep, or a number past Python's digit limit.
                end = -1
            if 0 <= end < len(self._text) and self._text[end] in _AFTER_VALUE:
                self._pos = end
                return value
            if len(self._text) - self._pos > _MAX_ROW or not self._more():
                if end < 0:
                    raise InvalidParameter("body")
                self._pos = end
                return value


def _lines(text: IO[str]) -> Iterator[str]:
    """The text's lines, none longer than a row may be: the csv module builds a whole record
    in memory, so a line of a million commas must be refused before it is read."""
    while line := text.readline(_MAX_ROW + 1):
        if len(line) > _MAX_ROW:
            raise InvalidParameter("body")
        yield line


def csv_rows(stream: IO[bytes]) -> Iterator[BulkRow]:
    """The rows of a CSV file whose first line names its columns (callerId, and optionally
    additionalParams, jpToken and from; others are ignored)."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(_lines(text))
        names = next(reader, None)
        if names is None:
            raise InvalidParameter("body")
        columns = {name.strip(): index for index, name in enumerate(names)}
        if "callerId" not in columns:
            raise InvalidParameter("callerId")
        for number, values in enumerate(reader, start=1):
            if not any(value.strip() for value in values):
                continue  # a blank line (a trailing newline, say) is no recipient
            row = {
                name: values[index]
                for name, index in columns.items()
                if index < len(values) and values[index].strip()
            }
            yield _row(number, JsonBody.of(row))
    except (UnicodeDecodeError, csv.Error):
        raise InvalidParameter("body") from None
    finally:
        text.detach()
