"""Status changes: the one place a message's status moves, always forwards.

The worker (provider accepted, failed), the provider callbacks and the sweeper all come here,
so "a final status is never moved backwards" is enforced once, by a conditional UPDATE.
Here are the rules (forwards only, what each status writes, what a message's parts add up to);
the statements that read and write are in `queries`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

import structlog
from sqlalchemy import BindParameter, ColumnElement, Update, bindparam, func
from sqlalchemy.orm import Session

from shared.core.models import SENT_BY_SERVICE, DeflectedCall, Message, MessageStatus
from shared.messages import queries

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


def apply_status(
    session: Session,
    sid: str | None,
    report: StatusReport,
    now: datetime,
    *,
    dedupe_key: str | None = None,
) -> bool:
    """Move the message to `report.status` if that is forwards; record the event either way.

    A report with a `dedupe_key` already recorded is a repeat (a provider retrying its
    callback, a replay): it is neither applied nor stored again."""
    if is_repeat(session, dedupe_key):
        log.info("message.status_repeat", status=report.status.value, source=report.source)
        return False
    current: str | None = None
    applied = False
    for _ in range(3):  # a concurrent writer may move the status between our read and write
        row = queries.status_of(session, sid) if sid else None
        current = row.status if row else None
        if row is None:
            break
        # Every log line about a message names it, its account and its campaign.
        structlog.contextvars.bind_contextvars(
            messageSid=sid, account=row.tenant_id, campaign=row.campaign_id
        )
        if not _is_forward(MessageStatus(row.status), report.status):
            break
        assert sid is not None  # a row was found by its sid
        values = _status_columns(
            report.status,
            now,
            provider_message_id=report.provider_message_id,
            error_code=report.error_code,
            error_message=report.error_message,
        )
        if queries.move_status(session, sid, row.status, values):
            applied = True
            break
    queries.store_event(
        session,
        _event_columns(sid if current is not None else None, report, applied, now, dedupe_key),
    )
    if current is None:
        log.warning("message.status_unmatched", status=report.status.value, source=report.source)
    elif applied:
        log.info("message.status", status=report.status.value, source=report.source)
        if sid and report.status in (MessageStatus.SENT, MessageStatus.DELIVERED):
            first_acceptance = MessageStatus(current) in _NOT_YET_ACCEPTED
            _mark_deflected_call(session, sid, report.status, now, first_acceptance)
    else:
        log.info("message.status_ignored", status=report.status.value, current=current)
    return applied


def sent_from_sending(session: Session, sid: str, report: StatusReport, now: datetime) -> bool:
    """`apply_status` for the worker's own `sent` on the message it holds, in one UPDATE that
    also returns what smsSent needs. False when the message was not `sending` (a callback got
    there first): then nothing was written, and the caller takes the general way."""
    row = queries.run_prepared_move(
        session,
        _SENT_FROM_SENDING,
        sid,
        {"now": now, "provider_message_id_": report.provider_message_id},
    )
    if row is None:
        return False
    queries.store_event_fast(session, _event_columns(sid, report, True, now))
    log.info("message.status", status=report.status.value, source=report.source)
    if row.token_id is not None:
        # `sending` is below `sent`: this is the provider's first acceptance of the message.
        queries.run_prepared_call_update(
            session,
            _FIRST_SENT_FOR_CALL,
            row.token_id,
            {"now": now, "campaign": row.campaign_id, "sid_": sid},
        )
    return True


def sent_from_sending_batch(
    session: Session,
    reports: Mapping[str, StatusReport],
    now: datetime,
    *,
    accounts: Mapping[str, str] | None = None,
) -> set[str]:
    """`sent_from_sending` for a batch of the worker's own `sent`s (PostgreSQL), in a few
    statements whatever its size: one UPDATE of the messages, one INSERT of their events, and
    the calls locked and updated (`queries.run_batch_call_updates`: a call with two messages
    in the batch takes a second round). Returns the sids it moved; the others were not
    `sending` (a callback got there first), nothing was written for them, and the caller
    takes the general way for each. `accounts`: each message's tenant, for its log line."""
    if not reports:
        return set()
    rows = queries.run_prepared_batch_move(
        session,
        _SENT_FROM_SENDING_BATCH,
        [(sid, report.provider_message_id) for sid, report in reports.items()],
        {"now": now},
    )
    queries.store_events_fast(
        session, [_event_columns(row.sid, reports[row.sid], True, now) for row in rows]
    )
    for row in rows:
        report = reports[row.sid]
        log.info(
            "message.status",
            status=report.status.value,
            source=report.source,
            messageSid=row.sid,
            account=(accounts or {}).get(row.sid),
            campaign=row.campaign_id,
        )
    # `sending` is below `sent`: each is the provider's first acceptance of its message.
    first_sent = _CALL_UPDATES[MessageStatus.SENT, True]
    queries.run_batch_call_updates(
        session,
        [
            queries.CallUpdate(first_sent, row.token_id, row.sid, row.campaign_id)
            for row in rows
            if row.token_id is not None
        ],
        now,
    )
    return {row.sid for row in rows}


@dataclass(frozen=True, slots=True)
class StatusMove:
    """A verified report for a message that exists, to apply with others (a group of
    provider callbacks): `apply_status_batch`."""

    sid: str
    report: StatusReport
    dedupe_key: str


def apply_status_batch(
    session: Session, moves: Sequence[StatusMove], targets: Mapping[str, Any], now: datetime
) -> list[bool]:
    """`apply_status` for many reports at once (PostgreSQL), in order, with the same outcome
    as one after the other: a repeat of a stored or earlier report is neither applied nor
    stored; a forward move is applied and every other report stored. `targets` are the
    messages, locked by this transaction (`queries.callback_targets`), so nothing moves them
    meanwhile. A few statements whatever the count: one read of the keys, one UPDATE per shape
    of move (a message that moves twice is written once, as both moves would leave it), one
    INSERT of the events, the calls' smsSent in token order. Whether each was applied."""
    recorded = queries.events_recorded(session, [move.dedupe_key for move in moves])
    current = {sid: MessageStatus(row.status) for sid, row in targets.items()}
    chains: dict[str, list[StatusReport]] = {}
    events: list[dict[str, Any]] = []
    calls: list[queries.CallUpdate] = []
    applied_each: list[bool] = []
    for move in moves:
        report, sid, row = move.report, move.sid, targets[move.sid]
        context = {"messageSid": sid, "account": row.tenant_id, "campaign": row.campaign_id}
        if move.dedupe_key in recorded:
            log.info(
                "message.status_repeat",
                status=report.status.value,
                source=report.source,
                messageSid=sid,
            )
            applied_each.append(False)
            continue
        recorded.add(move.dedupe_key)
        before = current[sid]
        applied = _is_forward(before, report.status)
        events.append(_event_columns(sid, report, applied, now, move.dedupe_key))
        applied_each.append(applied)
        if not applied:
            log.info(
                "message.status_ignored",
                status=report.status.value,
                current=before.value,
                **context,
            )
            continue
        current[sid] = report.status
        chains.setdefault(sid, []).append(report)
        log.info("message.status", status=report.status.value, source=report.source, **context)
        if report.status in (MessageStatus.SENT, MessageStatus.DELIVERED) and (
            row.token_id is not None
        ):
            statement = _CALL_UPDATES[report.status, before in _NOT_YET_ACCEPTED]
            calls.append(queries.CallUpdate(statement, row.token_id, sid, row.campaign_id))
    by_shape: dict[tuple[tuple[MessageStatus, bool, bool], ...], list[queries.StatusMoveRow]] = {}
    for sid, chain in chains.items():
        shape = tuple(
            (
                report.status,
                report.provider_message_id is not None,
                report.error_code is not None or report.error_message is not None,
            )
            for report in chain
        )
        with_error = [r for r in chain if r.error_code is not None or r.error_message is not None]
        by_shape.setdefault(shape, []).append(
            queries.StatusMoveRow(
                sid=sid,
                expected_status=targets[sid].status,
                # As one move after the other leaves them: the first provider id stays, the
                # last error wins.
                provider_message_id=next(
                    (r.provider_message_id for r in chain if r.provider_message_id), None
                ),
                error_code=with_error[-1].error_code if with_error else None,
                error_message=with_error[-1].error_message if with_error else None,
            )
        )
    # A message with a statusCallback that moves through several statuses in this one write
    # reports each of them, not only where it ends (the trigger sees one change).
    queries.queue_passed_status_callbacks(
        session,
        [
            {
                "message_sid": sid,
                "account_id": targets[sid].account_id,
                "url": targets[sid].status_callback,
                "status": report.status.value,
                "error_code": report.error_code,
                "error_message": report.error_message,
                "changed_at": now,
                "next_attempt_at": now,
            }
            for sid, chain in chains.items()
            if targets[sid].status_callback is not None
            for report in chain[:-1]
        ],
    )
    for shape, each in by_shape.items():
        queries.run_status_moves(session, _chain_move(shape), each, now)
    queries.store_events_once(session, events)
    queries.run_batch_call_updates(session, calls, now)
    return applied_each


@lru_cache(maxsize=256)
def _chain_move(shape: tuple[tuple[MessageStatus, bool, bool], ...]) -> Update:
    """The UPDATE for one message moved through these statuses in turn (each with or without
    a provider id and an error): every move's columns, from the one definition, later moves'
    over earlier ones', as the moves one after the other would write them."""
    values: dict[str, Any] = {}
    moves = queries.BATCH_MOVES.c
    for status, with_provider_id, with_error in shape:
        values.update(
            _status_columns(
                status,
                bindparam("now"),
                provider_message_id=moves.provider_message_id if with_provider_id else None,
                error_code=cast(str, moves.error_code) if with_error else None,
                error_message=cast(str, moves.error_message) if with_error else None,
            )
        )
    return queries.prepare_status_moves(values)


def is_repeat(session: Session, dedupe_key: str | None) -> bool:
    """Whether a report with this key is already recorded."""
    if dedupe_key is None:
        return False
    return queries.event_recorded(session, dedupe_key)


def _event_columns(
    sid: str | None,
    report: StatusReport,
    applied: bool,
    now: datetime,
    dedupe_key: str | None = None,
) -> dict[str, Any]:
    return dict(
        dedupe_key=dedupe_key,
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


# Statuses from which a provider's "sent" or "delivered" is its first word that it has it.
_NOT_YET_ACCEPTED = (MessageStatus.QUEUED, MessageStatus.SENDING, MessageStatus.IN_DOUBT)


def _is_forward(old: MessageStatus, new: MessageStatus) -> bool:
    # `sent` settles an `in_doubt` (the provider has it after all); nothing undoes a `sent`.
    settles_doubt = old is MessageStatus.IN_DOUBT and new is MessageStatus.SENT
    return not old.is_final and (new.rank > old.rank or settles_doubt)


# What varies in a status change: a Python value on the general path, a bindparam in the
# statements the fast path builds once at import, so that both write from one definition.
_At = datetime | BindParameter[datetime]
_Text = str | BindParameter[str] | ColumnElement[str]


def _status_columns(
    status: MessageStatus,
    now: _At,
    *,
    provider_message_id: _Text | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    """What a move to `status` writes to the message: the one definition for every path."""
    values: dict[str, Any] = {"status": status.value, "updated_at": now}
    if status.rank >= MessageStatus.SENT.rank:
        values["lease_expires_at"] = None
    if status in (MessageStatus.SENT, MessageStatus.DELIVERED):
        # A delivery receipt can overtake the worker's own "sent": both imply the provider has it.
        values["sent_at"] = func.coalesce(Message.sent_at, now)
        # What failed attempts left behind no longer describes the message.
        values["error_code"] = None
        values["error_message"] = None
        values["in_doubt_since"] = None
    if status is MessageStatus.DELIVERED:
        values["delivered_at"] = now
    if status.is_final:
        values["final_at"] = now
    if provider_message_id is not None:
        values["provider_message_id"] = func.coalesce(
            Message.provider_message_id, provider_message_id
        )
    if error_code is not None or error_message is not None:
        values["error_code"] = error_code
        values["error_message"] = error_message
    return values


def _mark_deflected_call(
    session: Session, sid: str, status: MessageStatus, now: datetime, first_acceptance: bool
) -> None:
    """smsSent for the Deflected Call Report: true once a provider has a message for the call.

    A call may get several SMS (the IVR asked again): the times are the call's firsts, the
    messageSid and campaign its latest SMS, and smsCount how many a provider took."""
    message = queries.call_of(session, sid)
    if message.token_id is not None:
        queries.update_call(
            session,
            message.token_id,
            _call_columns(sid, message.campaign_id, status, now, first_acceptance),
        )


def _call_columns(
    sid: _Text, campaign_id: _Text, status: MessageStatus, now: _At, first_acceptance: bool
) -> dict[str, Any]:
    """What the message's status writes to its call: the one definition for every path."""
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
    return values


# Built once, at import, from the definitions above: constructing and hashing these costs
# more CPU than running them. A `sent` from `sending` (the worker's own, on the message it
# holds), and that first acceptance on the message's call.
_SENT_FROM_SENDING = queries.prepare_move(
    MessageStatus.SENDING,
    _status_columns(
        MessageStatus.SENT,
        bindparam("now"),
        provider_message_id=bindparam("provider_message_id_"),
    ),
)
# The same `sent` for a whole batch, each message with its own provider id.
_SENT_FROM_SENDING_BATCH = queries.prepare_batch_move(
    MessageStatus.SENDING,
    _status_columns(
        MessageStatus.SENT,
        bindparam("now"),
        provider_message_id=queries.BATCH_SENT.c.provider_message_id,
    ),
)
_FIRST_SENT_FOR_CALL = queries.prepare_call_update(
    _call_columns(
        bindparam("sid_"),
        bindparam("campaign"),
        MessageStatus.SENT,
        bindparam("now"),
        first_acceptance=True,
    )
)


# smsSent for a status a callback moved a message to, by status and whether it is the
# provider's first acceptance of the message (a group of callbacks: `apply_status_batch`).
_CALL_UPDATES = {
    (status, first): queries.prepare_batch_call_update(
        _call_columns(
            queries.BATCH_CALLS.c.sid,
            queries.BATCH_CALLS.c.campaign,
            status,
            bindparam("now"),
            first,
        )
    )
    for status in (MessageStatus.SENT, MessageStatus.DELIVERED)
    for first in (True, False)
}


def find_sid(session: Session, provider: str, provider_message_id: str | None) -> str | None:
    """Our messageSid for a provider's message id, for callbacks that do not carry ours."""
    if not provider_message_id:
        return None
    found = queries.sid_by_provider_id(session, provider, provider_message_id)
    # The later parts of a multi-part message are known only as its parts.
    return found or queries.sid_by_part_id(session, provider, provider_message_id)


def apply_part_status(
    session: Session,
    sid: str | None,
    report: StatusReport,
    now: datetime,
    *,
    dedupe_key: str | None = None,
) -> bool:
    """A receipt for one SMS part of a message the provider took as several (Vonage answers
    one id and one receipt per part): the part moves forwards, and the message follows once
    every part has a final status, `delivered` only when all of them are."""
    if is_repeat(session, dedupe_key):
        log.info("message.status_repeat", status=report.status.value, source=report.source)
        return False
    # Locked: receipts for a message's parts arrive together, and each must see the
    # others' parts to know whether it completes the message.
    row = queries.parts_count_for_update(session, sid) if sid else None
    # Until the worker records the provider's answer, the parts we counted stand in for it.
    expected = (row.parts_expected or row.segments) if row else 1
    if row is None or expected <= 1 or not report.provider_message_id:
        return apply_status(session, sid, report, now, dedupe_key=dedupe_key)
    assert sid is not None
    _move_part(session, sid, report.provider_message_id, report.status, report.error_code, now)
    overall = _parts_outcome(session, sid)
    return apply_status(
        session,
        sid,
        StatusReport(
            overall.status if overall else MessageStatus.SENT,
            source=report.source,
            provider=report.provider,
            provider_status=report.provider_status,
            provider_message_id=report.provider_message_id,
            error_code=(overall.error_code if overall else None),
            payload=report.payload,
        ),
        now,
        dedupe_key=dedupe_key,
    )


def record_parts(
    session: Session, sid: str, part_ids: tuple[str, ...], unsent: int, now: datetime
) -> PartsOutcome | None:
    """The parts a provider answered with, as it answered; returns the message's final
    status if every part already has one (receipts can overtake the worker's record)."""
    queries.set_parts_count(session, sid, len(part_ids) + unsent, unsent)
    for index, part_id in enumerate(part_ids):
        _move_part(session, sid, part_id, MessageStatus.SENT, None, now, index=index)
    return _parts_outcome(session, sid)


def _move_part(
    session: Session,
    sid: str,
    part_id: str,
    status: MessageStatus,
    error_code: str | None,
    now: datetime,
    *,
    index: int | None = None,
) -> None:
    part = queries.part_for_update(session, sid, part_id)
    if part is None:
        queries.add_part(session, sid, part_id, index, status, error_code, now)
        return
    if index is not None:
        queries.set_part_index(part, index)
    if _is_forward(MessageStatus(part.status), status):
        queries.set_part_status(part, status, error_code, now)


@dataclass(frozen=True, slots=True)
class PartsOutcome:
    """What a multi-part message's parts add up to."""

    status: MessageStatus
    error_code: str | None


def _parts_outcome(session: Session, sid: str) -> PartsOutcome | None:
    """The message's final status from its parts', or None while any part is still out."""
    message = queries.parts_count(session, sid)
    parts = queries.part_statuses(session, sid)
    sent = (message.parts_expected or message.segments) - message.parts_unsent
    if len(parts) < sent or not all(MessageStatus(part.status).is_final for part in parts):
        return None
    for part in parts:
        if part.status != MessageStatus.DELIVERED.value:
            return PartsOutcome(MessageStatus(part.status), part.error_code)
    if message.parts_unsent:
        # Every part that went out arrived, but the provider refused the others: the
        # handset has an incomplete text.
        return PartsOutcome(MessageStatus.UNDELIVERED, "partial-send")
    return PartsOutcome(MessageStatus.DELIVERED, None)
