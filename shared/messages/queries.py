"""Every SQL statement about messages: accepting them, status changes with their delivery
events and parts, the deflected call's smsSent, opt-outs, claims and leases, retries and doubt,
failover, the outbox, reconciliation and the backlog. The services around it (accept,
lifecycle, optout, claims, send, outbox, reconcile) decide; this module reads and writes.

Hot statements are built once at import (constructing and hashing a statement costs more CPU
than running it) and run on the session's connection as plain SQL."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import (
    Boolean,
    ColumnElement,
    CursorResult,
    DateTime,
    Insert,
    Integer,
    Row,
    Text,
    Update,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from shared.core.models import (
    SENT_BY_EXTERNAL,
    Account,
    BulkBatch,
    Campaign,
    DeflectedCall,
    DeliveryEvent,
    Message,
    MessagePart,
    MessageStatus,
    OptOut,
    OutboxState,
    ProviderAccount,
    StatusCallback,
    table_of,
)

_messages = table_of(Message)
_JSON = msgspec.json.Encoder()
_providers = table_of(ProviderAccount)
_accounts = table_of(Account)
_opt_outs = table_of(OptOut)


_calls = table_of(DeflectedCall)
_events = table_of(DeliveryEvent)
# Arrays of strings bound as text[]: an array cast to varchar(n)[] cuts a longer element down
# without an error (PostgreSQL's explicit casts do), where a scalar bind of the same value fails
# or matches nothing.
_TEXTS = postgresql.ARRAY(Text)


def _status_is(*statuses: MessageStatus) -> ColumnElement[bool]:
    """`messages.status` is (among) these, written into the SQL text rather than bound: the
    sweeper's and the reconciler's partial indexes (`WHERE status = 'queued'` ...) serve only a
    query whose own predicate proves theirs, which a bound parameter in a prepared (generic)
    plan does not. The values are our enum's, never input."""
    literals: list[ColumnElement[str]] = [
        literal_column(f"'{status.value}'") for status in statuses
    ]
    if len(literals) == 1:
        return Message.status == literals[0]
    return Message.status.in_(literals)


# Built once: constructing and hashing these costs more CPU than running them.
_INSERT_MESSAGE = insert(_messages)
_INSERT_EVENT = insert(_events)


# Accept


# What accept writes of a new message; every other column keeps its default.
ACCEPTED_COLUMNS = (
    "sid",
    "account_id",
    "environment_id",
    "campaign_pk",
    "campaign_id",
    "token_id",
    "to_number",
    "from_number",
    "body",
    "segments",
    "encoding",
    "status",
    "provider",
    "provider_account_id",
    "idempotency_key",
    "request_fingerprint",
    "attempts",
    "created_at",
    "updated_at",
    "expires_at",
    "next_attempt_at",
    "status_callback",
)
# A group's messages in one statement built once (PostgreSQL): each column arrives as one array
# parameter and the arrays are unnested side by side into rows. An executemany costs a
# statement per row in the driver; this costs one, whatever the group's size.
_INSERT_MESSAGES_UNNESTED = insert(_messages).from_select(
    ACCEPTED_COLUMNS,
    select(
        *(
            func.unnest(bindparam(name, type_=postgresql.ARRAY(_messages.c[name].type))).label(name)
            for name in ACCEPTED_COLUMNS
        )
    ),
)


# The same statements as plain SQL for psycopg's own connection (shared/messages/group_sql.py:
# a group's reads in one round trip, its writes and COMMIT in another). The new messages
# arrive as one JSON array (`messages_json`): one parameter to quote, where twenty arrays
# cost the driver more CPU than the rest of the group's statements together.
INSERT_MESSAGES_SQL = (
    f"INSERT INTO messages ({', '.join(ACCEPTED_COLUMNS)})"  # noqa: S608 - our own names
    f" SELECT {', '.join(ACCEPTED_COLUMNS)} FROM json_populate_recordset(NULL::messages, %s)"
)
INSERT_KEYED_MESSAGES_SQL = (
    INSERT_MESSAGES_SQL + " ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING sid"
)
MESSAGES_BY_IDEMPOTENCY_KEYS_SQL = (
    "SELECT m.account_id, m.idempotency_key, m.sid, m.campaign_id, m.request_fingerprint"
    " FROM unnest(%s::integer[], %s::text[]) AS k(account_id, idempotency_key)"
    " JOIN messages AS m"
    " ON m.account_id = k.account_id AND m.idempotency_key = k.idempotency_key"
)
# `mark_published` with `unchanged_since`, durable (it rides on an accept's transaction).
# Parameters: now, sids, unchanged_since, unchanged_since. Rows another transaction holds are
# skipped, not waited for (see `mark_published`).
MARK_PUBLISHED_SQL = (
    "UPDATE messages SET published_at = %s WHERE sid IN (SELECT sid FROM messages"
    " WHERE sid = ANY(%s::text[]) AND (published_at IS NULL OR published_at < %s)"
    " AND updated_at <= %s FOR NO KEY UPDATE SKIP LOCKED)"
)


def messages_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """New messages as the JSON array INSERT_MESSAGES_SQL reads (timestamps as RFC 3339)."""
    return _JSON.encode([{"attempts": 0, **row} for row in rows]).decode()


def insert_messages(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """New messages, in one statement. Core, not the ORM unit of work: a third of an
    accept's CPU once went to flushing one row."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        columns = {
            name: [row.get(name, 0 if name == "attempts" else None) for row in rows]
            for name in ACCEPTED_COLUMNS
        }
        connection.execute(_INSERT_MESSAGES_UNNESTED, columns)
    else:
        connection.execute(_INSERT_MESSAGE, list(rows))


# A bulk batch's messages: the accepted columns and the batch's id.
BULK_COLUMNS = (*ACCEPTED_COLUMNS, "batch_id")
_COPY_BULK_SQL = f"COPY messages ({', '.join(BULK_COLUMNS)}) FROM STDIN"


def bulk_writer(session: Session) -> BulkWriter:
    """What stores chunks of a bulk batch's messages in the session's transaction. On
    PostgreSQL through COPY on the session's own connection: a fraction of an INSERT's cost per
    row, which is most of what storing a large batch costs. Resolved here, on the session's
    thread: the PostgreSQL writer may then run on another thread while this one prepares the
    next chunk, provided this one does not use the session meanwhile."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":

        def insert_rows(rows: Sequence[Mapping[str, Any]]) -> None:
            if rows:
                connection.execute(insert(_messages), [dict(row) for row in rows])

        return BulkWriter(insert_rows, concurrent=False)
    driver = connection.connection.driver_connection
    assert driver is not None
    values = operator.itemgetter(*BULK_COLUMNS)

    def copy_rows(rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        with driver.cursor() as cursor, cursor.copy(_COPY_BULK_SQL) as copy:
            for row in rows:
                copy.write_row(values(row))

    return BulkWriter(copy_rows, concurrent=True)


@dataclass(frozen=True, slots=True)
class BulkWriter:
    """`write(rows)`; `concurrent` when it may run on another thread than the session's."""

    write: Callable[[Sequence[Mapping[str, Any]]], None]
    concurrent: bool

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.write(rows)


_TIMEOUTS_SQL = text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
_SET_TIMEOUTS_SQL = text(
    "SELECT set_config('lock_timeout', :lock, true),"
    " set_config('statement_timeout', :statement, true)"
)


def transaction_timeouts(session: Session) -> tuple[str, str]:
    """PostgreSQL's lock and statement timeouts in force (see shared/core/db.py)."""
    lock, statement = session.execute(_TIMEOUTS_SQL).one()
    return str(lock), str(statement)


def set_transaction_timeouts(session: Session, lock: str, statement: str) -> None:
    """Other lock and statement timeouts for the rest of this transaction (PostgreSQL)."""
    session.execute(_SET_TIMEOUTS_SQL, {"lock": lock, "statement": statement})


def cancel_queued_in_batch(session: Session, batch_id: str, now: datetime) -> int:
    """Move a batch's queued messages to cancelled, each with its event; returns how many. A
    message a worker claimed meanwhile is no longer queued and is left alone."""
    # In sid order and skipping rows a worker's claim holds (that one is being sent): never a
    # deadlock with a claim, which locks its rows in sid order too. A message handed back to
    # the queue in doubt (the provider may have it) is not withdrawn: only a lookup settles it.
    withdrawn = (
        select(_messages.c.sid)
        .where(
            _messages.c.batch_id == batch_id,
            _messages.c.status == MessageStatus.QUEUED.value,
            _messages.c.in_doubt_since.is_(None),
        )
        .order_by(_messages.c.sid)
        .with_for_update(skip_locked=True, key_share=True)
    )
    cancelled = list(
        session.execute(
            update(_messages)
            .where(_messages.c.sid.in_(withdrawn))
            .values(
                status=MessageStatus.CANCELLED.value,
                error_message="the bulk batch was cancelled",
                final_at=now,
                updated_at=now,
            )
            .returning(_messages.c.sid)
        ).scalars()
    )
    if cancelled:
        session.execute(
            insert(_events),
            [
                {
                    "message_sid": sid,
                    "source": "api",
                    "status": MessageStatus.CANCELLED.value,
                    "applied": True,
                    "created_at": now,
                }
                for sid in cancelled
            ],
        )
    return len(cancelled)


def insert_keyed_messages(session: Session, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """New messages with an Idempotency-Key, in one statement; returns the sids inserted. One
    whose key another message already holds (a concurrent twin) is left out, not an error."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(_messages)
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(_messages.c.sid)
    )
    return set(session.connection().execute(statement, list(rows)).scalars())


@dataclass(frozen=True, slots=True)
class EarlierMessage:
    """The message an Idempotency-Key already stands for."""

    sid: str
    campaign_id: str
    request_fingerprint: str | None


def messages_by_idempotency_keys(
    session: Session, keys: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], EarlierMessage]:
    """The messages that hold these (account, Idempotency-Key) pairs, in one query."""
    rows = session.execute(
        select(
            Message.account_id,
            Message.idempotency_key,
            Message.sid,
            Message.campaign_id,
            Message.request_fingerprint,
        ).where(tuple_(Message.account_id, Message.idempotency_key).in_(list(keys)))
    ).all()
    return {
        (row.account_id, row.idempotency_key): EarlierMessage(
            row.sid, row.campaign_id, row.request_fingerprint
        )
        for row in rows
    }


def drop_messages(session: Session, sids: Sequence[str]) -> None:
    """Take back messages written in this transaction, before it commits."""
    session.execute(
        delete(Message)
        .where(Message.sid.in_(list(sids)))
        .execution_options(synchronize_session=False)
    )


def mark_call_sent_externally(
    session: Session, token_id: int, campaign_id: str, now: datetime
) -> None:
    """smsSent for a call whose SMS the caller's own gateway sent (Notify SMS)."""
    session.execute(
        update(DeflectedCall)
        .where(DeflectedCall.token_id == token_id)
        .values(
            sms_sent=True,
            sms_sent_at=func.coalesce(DeflectedCall.sms_sent_at, now),
            sms_sent_by=func.coalesce(DeflectedCall.sms_sent_by, SENT_BY_EXTERNAL),
            campaign_id=campaign_id,
        )
    )


# Status changes


def status_of(session: Session, sid: str) -> Row[str, str, str] | None:
    """The message's status, campaign and tenant, or None if there is no such message."""
    return session.execute(
        select(Message.status, Message.campaign_id, Account.tenant_id)
        .join(Account, Account.id == Message.account_id)
        .where(Message.sid == sid)
    ).first()


def move_status(session: Session, sid: str, expected: str, values: Mapping[str, Any]) -> bool:
    """Write `values` if the message is still in status `expected`; whether it was."""
    result = session.execute(
        update(Message).where(Message.sid == sid, Message.status == expected).values(**values)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def prepare_move(expected: MessageStatus, values: Mapping[str, Any]) -> Update:
    """`move_status` built once, for a fast path: `values` holds bindparams for what varies,
    and the statement returns what smsSent needs. Run it with `run_prepared_move`."""
    return (
        update(_messages)
        .where(_messages.c.sid == bindparam("message_sid"), _messages.c.status == expected.value)
        .values(**values)
        .returning(_messages.c.token_id, _messages.c.campaign_id)
    )


def run_prepared_move(
    session: Session, statement: Update, sid: str, params: Mapping[str, Any]
) -> Row[int | None, str] | None:
    """The message's token id and campaign if `statement` (from `prepare_move`) moved it."""
    return session.connection().execute(statement, {"message_sid": sid, **params}).first()


def event_recorded(session: Session, dedupe_key: str) -> bool:
    """Whether a delivery event with this key is already stored."""
    return (
        session.scalar(select(DeliveryEvent.id).where(DeliveryEvent.dedupe_key == dedupe_key))
        is not None
    )


def store_event(session: Session, columns: Mapping[str, Any]) -> None:
    statement: Insert = _INSERT_EVENT
    if columns["dedupe_key"] is not None:
        # Two copies of one callback racing each other: the second finds the key taken.
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        statement = dialect.insert(_events).on_conflict_do_nothing(index_elements=["dedupe_key"])
    session.execute(statement, columns)


def store_event_fast(session: Session, columns: Mapping[str, Any]) -> None:
    """`store_event` for an event without a dedupe key, on the connection (the fast path)."""
    session.connection().execute(_INSERT_EVENT, columns)


# A group of provider callbacks, set-based (lifecycle.apply_status_batch)

# Each message a group of callbacks names, with what binding, the lifecycle and smsSent need,
# locked in messageSid order (the order the worker's batch statements lock them in too), so
# that no status moves under the group while it decides.
_CALLBACK_TARGETS = (
    select(
        _messages.c.sid,
        _messages.c.status,
        _messages.c.campaign_id,
        _messages.c.token_id,
        _messages.c.provider_account_id,
        _messages.c.account_id,
        _messages.c.status_callback,
        _accounts.c.tenant_id,
        _providers.c.provider.label("signer_provider"),
        _providers.c.public_id.label("signer_public_id"),
        _providers.c.credentials.label("signer_credentials"),
    )
    .select_from(
        _messages.join(_accounts, _accounts.c.id == _messages.c.account_id).outerjoin(
            _providers, _providers.c.id == _messages.c.provider_account_id
        )
    )
    # An array, not an expanding IN: one SQL text whatever the count, so neither SQLAlchemy
    # nor psycopg rewrites the query for every group (3% of the API's time applying callbacks).
    .where(_messages.c.sid == any_(bindparam("sids", type_=_TEXTS)))
    .order_by(_messages.c.sid)
    # FOR NO KEY UPDATE, as everywhere a message is locked: nothing changes a message's sid,
    # and the stronger FOR UPDATE would make every insert that refers to the message (another
    # transaction's delivery event, part or status callback, whose foreign key check takes KEY
    # SHARE) wait for this transaction: 10 ms an insert of a callback group's events, measured
    # beside a draining bulk batch.
    .with_for_update(of=_messages, key_share=True)
)
_RECORDED_KEYS = select(_events.c.dedupe_key).where(
    _events.c.dedupe_key == any_(bindparam("keys", type_=_TEXTS))
)
# Many events as arrays, in one statement whose text never changes: a multi-row INSERT's text
# grows with its row count, and psycopg parses every new text again (its query cache keeps only
# short ones): 9% of a busy worker's CPU went to that (py-spy, dispatch at 0 ms).
_EVENT_COLUMNS = (
    "message_sid",
    "source",
    "status",
    "provider",
    "provider_message_id",
    "provider_status",
    "error_code",
    "applied",
    "payload",
    "dedupe_key",
    "created_at",
)
_EVENT_ROWS = (
    func.unnest(
        *(bindparam(f"ev_{name}", type_=_TEXTS) for name in _EVENT_COLUMNS[:7]),
        bindparam("ev_applied", type_=postgresql.ARRAY(Boolean)),
        bindparam("ev_payload", type_=_TEXTS),
        bindparam("ev_dedupe_key", type_=_TEXTS),
        bindparam("ev_created_at", type_=postgresql.ARRAY(DateTime(timezone=True))),
    )
    .table_valued(*_EVENT_COLUMNS)
    .render_derived(name="ev")
)
_EVENTS_FROM_ARRAYS = select(
    *(_EVENT_ROWS.c[name] for name in _EVENT_COLUMNS[:8]),
    cast(_EVENT_ROWS.c.payload, JSONB),
    _EVENT_ROWS.c.dedupe_key,
    _EVENT_ROWS.c.created_at,
)
_INSERT_EVENTS = postgresql.insert(_events).from_select(_EVENT_COLUMNS, _EVENTS_FROM_ARRAYS)
_INSERT_EVENTS_ONCE = _INSERT_EVENTS.on_conflict_do_nothing(index_elements=["dedupe_key"])


def _event_arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    # The payload as the engine's JSON type would write it (json.dumps; None as JSON null).
    arrays: dict[str, list[Any]] = {f"ev_{name}": [] for name in _EVENT_COLUMNS}
    for row in rows:
        for name in _EVENT_COLUMNS:
            value = row.get(name)
            arrays[f"ev_{name}"].append(json.dumps(value) if name == "payload" else value)
    return arrays


def callback_targets(session: Session, sids: Sequence[str]) -> dict[str, Any]:
    """The messages among `sids`, locked, with their provider account (PostgreSQL)."""
    if not sids:
        return {}
    rows = session.connection().execute(_CALLBACK_TARGETS, {"sids": sorted(set(sids))})
    return {row.sid: row for row in rows}


def events_recorded(session: Session, keys: Sequence[str]) -> set[str]:
    """Which of these dedupe keys are stored already."""
    if not keys:
        return set()
    found = session.connection().execute(_RECORDED_KEYS, {"keys": list(set(keys))})
    return {row.dedupe_key for row in found}


def store_events_once(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """`store_event` for many (PostgreSQL), in one statement: a key already taken (a copy of
    the callback racing this one) is skipped, as there."""
    if rows:
        session.connection().execute(_INSERT_EVENTS_ONCE, _event_arrays(rows))


# The rows a set-based status move reads (`prepare_status_moves`): one per message, with the
# status it must still be in and what the move writes besides the status.
BATCH_MOVES = (
    func.unnest(
        bindparam("move_sids", type_=_TEXTS),
        bindparam("move_expected", type_=_TEXTS),
        bindparam("move_provider_ids", type_=_TEXTS),
        bindparam("move_error_codes", type_=_TEXTS),
        bindparam("move_error_messages", type_=_TEXTS),
    )
    .table_valued("sid", "expected_status", "provider_message_id", "error_code", "error_message")
    .render_derived(name="moves")
)


@dataclass(frozen=True, slots=True)
class StatusMoveRow:
    """One message's row of BATCH_MOVES."""

    sid: str
    expected_status: str
    provider_message_id: str | None
    error_code: str | None
    error_message: str | None


def prepare_status_moves(values: Mapping[str, Any]) -> Update:
    """`move_status` for many messages in one statement (PostgreSQL), built once for one
    shape of `values`, which refer to each message's row of BATCH_MOVES for what varies and
    to the bindparam `now`. Run it with `run_status_moves`."""
    return (
        update(_messages)
        .where(
            _messages.c.sid == BATCH_MOVES.c.sid,
            _messages.c.status == BATCH_MOVES.c.expected_status,
        )
        .values(**values)
    )


def run_status_moves(
    session: Session, statement: Update, moves: Sequence[StatusMoveRow], now: datetime
) -> None:
    """One statement for all `moves` (one per message), as arrays: psycopg would run an
    executemany in pipeline mode, whose wait spins the CPU on an event loop (13% of the API's
    time while it applied callbacks)."""
    if moves:
        session.connection().execute(
            statement,
            {
                "move_sids": [move.sid for move in moves],
                "move_expected": [move.expected_status for move in moves],
                "move_provider_ids": [move.provider_message_id for move in moves],
                "move_error_codes": [move.error_code for move in moves],
                "move_error_messages": [move.error_message for move in moves],
                "now": now,
            },
        )


def queue_passed_status_callbacks(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Status callbacks for the statuses a message passed through within one write (a group
    of provider callbacks moves it sending -> sent -> delivered in one UPDATE, whose trigger
    sees only the last): written just before that UPDATE, so they come first."""
    if rows:
        session.execute(insert(table_of(StatusCallback)), list(rows))


# The rows a set-based call update reads (`prepare_batch_call_update`): one per call, with
# the message that moved it and that message's campaign.
BATCH_CALLS = (
    func.unnest(
        bindparam("call_token_ids", type_=postgresql.ARRAY(_calls.c.token_id.type)),
        bindparam("call_sids", type_=_TEXTS),
        bindparam("call_campaigns", type_=_TEXTS),
    )
    .table_valued("token_id", "sid", "campaign")
    .render_derived(name="moved")
)
_LOCK_CALLS = (
    select(_calls.c.token_id)
    .where(_calls.c.token_id == any_(bindparam("token_ids", type_=postgresql.ARRAY(Integer))))
    .order_by(_calls.c.token_id)
    .with_for_update()
)


def prepare_batch_call_update(values: Mapping[str, Any]) -> Update:
    """`prepare_call_update` for many calls in one statement (PostgreSQL): `values` refer to
    each call's row of BATCH_CALLS (`sid`, `campaign`) and to the bindparam `now`. Run it with
    `run_batch_call_updates`."""
    return update(_calls).where(_calls.c.token_id == BATCH_CALLS.c.token_id).values(**values)


@dataclass(frozen=True, slots=True)
class CallUpdate:
    """What a message's status writes to its call: `statement` from
    `prepare_batch_call_update`."""

    statement: Update
    token_id: int
    sid: str
    campaign: str


def run_batch_call_updates(session: Session, updates: Sequence[CallUpdate], now: datetime) -> None:
    """Many calls' updates with the same outcome as one after the other in the order given,
    each statement run once per round, its calls as arrays (no executemany: see
    `run_status_moves`). A call named twice (two of its messages in one batch) takes its
    second update in a second round: one UPDATE must not name a row twice. The calls are
    locked first, in token order, as every batch locks them (the old executemany did too), so
    none waits on another in a circle: an UPDATE over arrays locks in whatever order its plan
    visits the rows."""
    pending = list(updates)
    connection = session.connection()
    tokens = sorted({update_.token_id for update_ in pending})
    if len(tokens) > 1:
        connection.execute(_LOCK_CALLS, {"token_ids": tokens})
    while pending:
        this_round: dict[int, CallUpdate] = {}
        later: list[CallUpdate] = []
        for update_ in pending:
            if update_.token_id in this_round:
                later.append(update_)
            else:
                this_round[update_.token_id] = update_
        by_statement: dict[int, list[CallUpdate]] = {}
        for token_id in sorted(this_round):
            update_ = this_round[token_id]
            by_statement.setdefault(id(update_.statement), []).append(update_)
        for each in by_statement.values():
            connection.execute(
                each[0].statement,
                {
                    "call_token_ids": [update_.token_id for update_ in each],
                    "call_sids": [update_.sid for update_ in each],
                    "call_campaigns": [update_.campaign for update_ in each],
                    "now": now,
                },
            )
        pending = later


# The deflected call's smsSent


def call_of(session: Session, sid: str) -> Row[int | None, str]:
    """The message's interaction token (None if it has none) and campaign."""
    return session.execute(
        select(Message.token_id, Message.campaign_id).where(Message.sid == sid)
    ).one()


def update_call(session: Session, token_id: int, values: Mapping[str, Any]) -> None:
    session.execute(
        update(DeflectedCall).where(DeflectedCall.token_id == token_id).values(**values)
    )


def prepare_call_update(values: Mapping[str, Any]) -> Update:
    """`update_call` built once, for a fast path: `values` holds bindparams for what varies.
    Run it with `run_prepared_call_update`."""
    return update(_calls).where(_calls.c.token_id == bindparam("token_id_")).values(**values)


def run_prepared_call_update(
    session: Session, statement: Update, token_id: int, params: Mapping[str, Any]
) -> None:
    session.connection().execute(statement, {"token_id_": token_id, **params})


# Provider message ids and multi-part messages


def sid_by_provider_id(session: Session, provider: str, provider_message_id: str) -> str | None:
    return session.scalar(
        select(Message.sid).where(
            Message.provider == provider, Message.provider_message_id == provider_message_id
        )
    )


def sid_by_part_id(session: Session, provider: str, provider_message_id: str) -> str | None:
    return session.scalar(
        select(MessagePart.message_sid)
        .join(Message, Message.sid == MessagePart.message_sid)
        .where(Message.provider == provider, MessagePart.provider_message_id == provider_message_id)
    )


def parts_count_for_update(session: Session, sid: str) -> Row[int | None, int] | None:
    """The message's expected parts and segments, locked against concurrent part receipts."""
    return session.execute(
        select(Message.parts_expected, Message.segments)
        .where(Message.sid == sid)
        .with_for_update(key_share=True)
    ).first()


def parts_count(session: Session, sid: str) -> Row[int | None, int, int]:
    """The message's expected parts, parts the provider refused, and segments."""
    return session.execute(
        select(Message.parts_expected, Message.parts_unsent, Message.segments).where(
            Message.sid == sid
        )
    ).one()


def set_parts_count(session: Session, sid: str, expected: int, unsent: int) -> None:
    session.execute(
        update(Message)
        .where(Message.sid == sid)
        .values(parts_expected=expected, parts_unsent=unsent)
    )


def part_statuses(session: Session, sid: str) -> Sequence[Row[str, str | None]]:
    """The status and error code of every part recorded for the message."""
    return session.execute(
        select(MessagePart.status, MessagePart.error_code).where(MessagePart.message_sid == sid)
    ).all()


def part_for_update(session: Session, sid: str, part_id: str) -> MessagePart | None:
    return session.get(MessagePart, (sid, part_id), with_for_update=True)


def add_part(
    session: Session,
    sid: str,
    part_id: str,
    index: int | None,
    status: MessageStatus,
    error_code: str | None,
    now: datetime,
) -> None:
    session.add(
        MessagePart(
            message_sid=sid,
            provider_message_id=part_id,
            part_index=index,
            status=status.value,
            error_code=error_code,
            updated_at=now,
        )
    )
    session.flush()


def set_part_index(part: MessagePart, index: int) -> None:
    """Written at the session's next flush, as every change to a loaded row."""
    part.part_index = index


def set_part_status(
    part: MessagePart, status: MessageStatus, error_code: str | None, now: datetime
) -> None:
    """Written at the session's next flush, as every change to a loaded row."""
    part.status = status.value
    part.error_code = error_code
    part.updated_at = now


# Opt-outs


def opt_out_exists(session: Session, owner_id: int, sender: str, recipient: str) -> bool:
    return (
        session.scalar(
            select(OptOut.id).where(
                OptOut.account_id == owner_id,
                OptOut.sender == sender,
                OptOut.recipient == recipient,
            )
        )
        is not None
    )


def add_opt_out_row(
    session: Session, owner_id: int, sender: str, recipient: str, keyword: str, now: datetime
) -> None:
    """Added to the session: a duplicate surfaces as an IntegrityError when it is flushed."""
    session.add(
        OptOut(
            account_id=owner_id,
            sender=sender,
            recipient=recipient,
            keyword=keyword,
            created_at=now,
        )
    )


def delete_opt_out(session: Session, owner_id: int, sender: str, recipient: str) -> None:
    session.execute(
        delete(OptOut).where(
            OptOut.account_id == owner_id,
            OptOut.sender == sender,
            OptOut.recipient == recipient,
        )
    )


# Claims


def _claimed(now: Any, lease: Any) -> dict[str, Any]:
    """What taking a message for sending writes: the one definition both claims use."""
    return dict(
        status=MessageStatus.SENDING.value,
        attempts=_messages.c.attempts + 1,
        claimed_at=now,
        lease_expires_at=lease,
        updated_at=now,
    )


def _take_queued_where(sids: ColumnElement[bool]) -> Update:
    """The one-statement claim of the queued messages `sids` picks: the one definition the
    single and the batch claim use (the batch's also returns each message's sid)."""
    return (
        update(_messages)
        .where(
            sids,
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
        .values(**_claimed(bindparam("now"), bindparam("lease")))
        .returning(
            _messages.c.sid,
            _messages.c.to_number,
            _messages.c.from_number,
            _messages.c.body,
            _messages.c.attempts,
            _messages.c.expires_at,
            _messages.c.campaign_id,
            _messages.c.segments,
            _messages.c.provider_failures,
            _messages.c.in_doubt_since,
            _messages.c.batch_id,
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


_TAKE_QUEUED = _take_queued_where(_messages.c.sid == bindparam("message_sid"))


def take_queued(session: Session, sid: str, now: datetime, lease: datetime) -> Row[Any] | None:
    """The common claim in one statement (PostgreSQL): a queued message, in time, to a
    recipient who did not opt out, taken and read back with its provider settings."""
    return (
        session.connection()
        .execute(_TAKE_QUEUED, {"message_sid": sid, "now": now, "lease": lease})
        .first()
    )


def message_for_claim(
    session: Session, sid: str
) -> tuple[Message, ProviderAccount, str, int | None] | None:
    """The message with its provider settings, its tenant and its account's attempt limit."""
    row = session.execute(
        select(Message, ProviderAccount, Account.tenant_id, Account.max_send_attempts)
        .join(ProviderAccount, ProviderAccount.id == Message.provider_account_id)
        .join(Account, Account.id == Message.account_id)
        .where(Message.sid == sid)
    ).first()
    return None if row is None else (row[0], row[1], row[2], row[3])


def take_as_read(
    session: Session, sid: str, status: str, attempts: int, now: datetime, lease: datetime
) -> bool:
    """Claim the message only if it is still as it was read (status and attempts)."""
    result = session.execute(
        update(Message)
        .where(Message.sid == sid, Message.status == status, Message.attempts == attempts)
        .values(**_claimed(now, lease))
        # Leave the message object as it was read: the claim is built from pre-claim values.
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return bool(result.rowcount == 1)


def provider_accounts_in_order(session: Session, owner_id: int) -> list[ProviderAccount]:
    return list(
        session.scalars(
            select(ProviderAccount)
            .where(ProviderAccount.account_id == owner_id)
            .order_by(ProviderAccount.priority, ProviderAccount.id)
        )
    )


def move_to_provider(
    session: Session,
    sid: str,
    from_provider_account_id: int,
    to: ProviderAccount,
    sender: str,
    now: datetime,
) -> Message | None:
    """Move a message being sent to another provider account; None if it is not ours to move."""
    result = session.execute(
        update(Message)
        .where(
            Message.sid == sid,
            Message.status == MessageStatus.SENDING.value,
            Message.provider_account_id == from_provider_account_id,
        )
        .values(
            provider=to.provider,
            provider_account_id=to.id,
            from_number=sender,
            provider_failures=0,
            updated_at=now,
        )
    )
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        return None
    return session.get_one(Message, sid)


def hand_back(session: Session, sid: str, values: dict[str, Any], now: datetime) -> None:
    """A message being sent goes back to `queued` with `values` (when to try next, why): the
    one way a claim is given up, whether for a rate limit, a retry or a lookup."""
    session.execute(
        update(Message)
        .where(Message.sid == sid, Message.status == MessageStatus.SENDING.value)
        .values(
            status=MessageStatus.QUEUED.value,
            lease_expires_at=None,
            published_at=None,
            updated_at=now,
            **values,
        )
    )


def in_doubt_since(since: datetime) -> ColumnElement[Any]:
    """An earlier call in doubt keeps its time: the first doubtful call is the one to look for."""
    return func.coalesce(Message.in_doubt_since, since)


def clear_doubt(session: Session, sid: str) -> None:
    session.execute(
        update(Message)
        .where(Message.sid == sid)
        .values(in_doubt_since=None, updated_at=Message.updated_at)
    )


def note_doubt(session: Session, sid: str, since: datetime, now: datetime) -> None:
    session.execute(
        update(Message)
        .where(Message.sid == sid, Message.in_doubt_since.is_(None))
        .values(in_doubt_since=since, updated_at=now)
    )


def keep_provider_message_id(session: Session, sid: str, provider_message_id: str) -> None:
    """The provider's id, if the message has none yet (a receipt overtook the worker's record)."""
    session.execute(
        update(Message)
        .where(Message.sid == sid, Message.provider_message_id.is_(None))
        .values(provider_message_id=provider_message_id)
    )


def provider_ids_near(
    session: Session,
    provider_account_id: int,
    to_number: str,
    from_number: str,
    except_sid: str,
    since: datetime,
) -> frozenset[str]:
    """Provider ids our other messages to this number from this sender hold, since `since`."""
    return frozenset(
        session.scalars(
            select(Message.provider_message_id).where(
                Message.provider_account_id == provider_account_id,
                Message.to_number == to_number,
                Message.from_number == from_number,
                Message.sid != except_sid,
                Message.provider_message_id.is_not(None),
                Message.created_at >= since,
            )
        )
    )


# Batch claims


# One array parameter (`sid = any(:sids)`): one statement whatever the batch's size.
_TAKE_QUEUED_BATCH = _take_queued_where(
    _messages.c.sid == func.any(bindparam("message_sids", type_=_TEXTS))
)


def take_queued_batch(
    session: Session, sids: Sequence[str], now: datetime, lease: datetime
) -> Sequence[Row[Any]]:
    """`take_queued` for every message of a batch in one statement (PostgreSQL): those it
    took, each with its sid. The sids go in sorted, so concurrent claims and marks over
    overlapping batches lock their rows in one order."""
    return (
        session.connection()
        .execute(_TAKE_QUEUED_BATCH, {"message_sids": sorted(sids), "now": now, "lease": lease})
        .all()
    )


# Batch sent


# The rows a batch move reads: one per message, with the provider's id for it.
BATCH_SENT = (
    func.unnest(
        bindparam("message_sids", type_=_TEXTS),
        bindparam(
            "provider_message_ids",
            type_=_TEXTS,
        ),
    )
    .table_valued("sid", "provider_message_id")
    .render_derived(name="sent")
)


def prepare_batch_move(expected: MessageStatus, values: Mapping[str, Any]) -> Update:
    """`prepare_move` for many messages in one statement (PostgreSQL): the sids and provider
    message ids come as two arrays, unnested into the rows `sent(sid, provider_message_id)`
    that `values` may refer to through `BATCH_SENT`. Returns each moved message's sid, token
    id and campaign. Run it with `run_prepared_batch_move`."""
    return (
        update(_messages)
        .where(
            _messages.c.sid == BATCH_SENT.c.sid,
            _messages.c.status == expected.value,
        )
        .values(**values)
        .returning(_messages.c.sid, _messages.c.token_id, _messages.c.campaign_id)
    )


def run_prepared_batch_move(
    session: Session,
    statement: Update,
    moves: Sequence[tuple[str, str | None]],
    params: Mapping[str, Any],
) -> Sequence[Row[str, int | None, str]]:
    """The sid, token id and campaign of each message `statement` (from `prepare_batch_move`)
    moved, of the (sid, provider message id) pairs given; sorted by sid, for the lock order."""
    ordered = sorted(moves)
    return (
        session.connection()
        .execute(
            statement,
            {
                "message_sids": [sid for sid, _ in ordered],
                "provider_message_ids": [pid for _, pid in ordered],
                **params,
            },
        )
        .all()
    )


def store_events_fast(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """`store_event_fast` for many events without a dedupe key (PostgreSQL), in one
    statement."""
    if rows:
        session.connection().execute(_INSERT_EVENTS, _event_arrays(rows))


# The outbox


_MARK_PUBLISHED = (
    update(_messages)
    .where(_messages.c.sid.in_(bindparam("sids", expanding=True)))
    .values(published_at=bindparam("now"))
)
# Only rows still unmarked and untouched since publishing began (see outbox.mark_published).
_MARK_PUBLISHED_UNCHANGED = _MARK_PUBLISHED.where(
    or_(
        _messages.c.published_at.is_(None),
        _messages.c.published_at < bindparam("unchanged_since"),
    ),
    _messages.c.updated_at <= bindparam("unchanged_since"),
)

# The same on PostgreSQL, skipping the rows another transaction holds instead of waiting for
# them: that transaction is changing the row (a worker's claim or send, a callback), so its
# `updated_at` moves past `unchanged_since` and the mark would not apply anyway; should it roll
# back, the message stays unmarked and the sweeper publishes it again (a harmless copy). The
# API's marks ride on its accept transactions, which must never wait for a worker.
_MARK_PUBLISHED_UNCHANGED_SKIP_LOCKED = (
    update(_messages)
    .where(
        _messages.c.sid.in_(
            select(_messages.c.sid)
            .where(
                _messages.c.sid.in_(bindparam("sids", expanding=True)),
                or_(
                    _messages.c.published_at.is_(None),
                    _messages.c.published_at < bindparam("unchanged_since"),
                ),
                _messages.c.updated_at <= bindparam("unchanged_since"),
            )
            .with_for_update(skip_locked=True, key_share=True)
        )
    )
    .values(published_at=bindparam("now"))
)


def mark_published(
    session: Session,
    sids: list[str],
    now: datetime,
    *,
    unchanged_since: datetime | None = None,
    durable: bool = False,
) -> None:
    """Note that the send tasks are on the queue. With `unchanged_since`, only rows still
    unmarked and untouched since then (on PostgreSQL, and not held by another transaction:
    see above). Unless `durable` (the transaction carries more than this
    mark), its COMMIT does not wait for the disk."""
    connection = session.connection()
    if connection.dialect.name == "postgresql" and not durable:
        # Losing this mark in a crash only costs a harmless re-publish, so skip the fsync wait.
        connection.execute(_ASYNCHRONOUS_COMMIT)
    if unchanged_since is None:
        connection.execute(_MARK_PUBLISHED, {"sids": sids, "now": now})
    else:
        connection.execute(
            _MARK_PUBLISHED_UNCHANGED_SKIP_LOCKED
            if connection.dialect.name == "postgresql"
            else _MARK_PUBLISHED_UNCHANGED,
            {"sids": sids, "now": now, "unchanged_since": unchanged_since},
        )


_ASYNCHRONOUS_COMMIT = text("SET LOCAL synchronous_commit TO OFF")


def unpublished(
    session: Session, now: datetime, created_before: datetime, limit: int
) -> list[tuple[str, str | None]]:
    """Single sends queued and not on the queue whose time has come, and messages of either
    lane whose worker's lease ran out not yet published again since; oldest first, each with
    its bulk batch's id (None for a single send). A bulk batch's queued messages are the bulk
    pump's (`bulk_due`), not the sweeper's."""
    due = or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now)
    query = (
        select(Message.sid, Message.batch_id)
        .where(
            or_(
                and_(
                    _status_is(MessageStatus.QUEUED),
                    Message.batch_id.is_(None),
                    Message.published_at.is_(None),
                    Message.created_at <= created_before,
                    due,
                ),
                and_(
                    _status_is(MessageStatus.SENDING),
                    Message.lease_expires_at <= now,
                    or_(
                        Message.published_at.is_(None),
                        Message.published_at < Message.lease_expires_at,
                    ),
                ),
            )
        )
        .order_by(Message.created_at)
        .limit(limit)
    )
    return [(sid, batch_id) for sid, batch_id in session.execute(query)]


def unmark_published_before(session: Session, before: datetime, *, bulk: bool = False) -> int:
    """Queued messages published before `before`, made due again: single sends for the
    sweeper, or (`bulk`) the messages of unfinished bulk batches for the bulk pump."""
    lane = (
        Message.batch_id.in_(select(BulkBatch.id).where(BulkBatch.finished_at.is_(None)))
        if bulk
        else Message.batch_id.is_(None)
    )
    result = session.execute(
        update(Message)
        .where(
            _status_is(MessageStatus.QUEUED),
            lane,
            Message.published_at.is_not(None),
            Message.published_at < before,
        )
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


# The bulk lane (shared/messages/lanes.py)


def unfinished_batches(
    session: Session,
) -> list[tuple[str, int, bool, datetime | None, str | None]]:
    """Every bulk batch the pump still looks at, oldest first: (id, account id, cancelled,
    when the pump last served it, its campaign's quiet hours)."""
    query = (
        select(
            BulkBatch.id,
            BulkBatch.account_id,
            BulkBatch.cancelled_at.is_not(None),
            BulkBatch.pumped_at,
            Campaign.quiet_hours,
        )
        .join(Campaign, Campaign.id == BulkBatch.campaign_pk)
        .where(BulkBatch.finished_at.is_(None))
        .order_by(BulkBatch.created_at, BulkBatch.id)
    )
    return [(row[0], row[1], row[2], row[3], row[4]) for row in session.execute(query)]


def numbers_of(session: Session, sids: Sequence[str]) -> dict[str, str]:
    """The recipients' numbers of these messages, by sid."""
    query = select(Message.sid, Message.to_number).where(Message.sid.in_(sids))
    return {sid: number for sid, number in session.execute(query)}


def defer(session: Session, sids: Sequence[str], until: datetime, validity: timedelta) -> None:
    """Queued messages wait until `until` (quiet hours), their validity counted from then."""
    session.execute(
        update(Message)
        .where(Message.sid.in_(sids), _status_is(MessageStatus.QUEUED))
        .values(
            next_attempt_at=until,
            expires_at=func.greatest(Message.expires_at, until + validity)
            if session.get_bind().dialect.name == "postgresql"
            else func.max(Message.expires_at, until + validity),
        )
        .execution_options(synchronize_session=False)
    )


def mark_batch_pumped(session: Session, batch_id: str, at: datetime) -> None:
    session.execute(update(BulkBatch).where(BulkBatch.id == batch_id).values(pumped_at=at))


def bulk_due(session: Session, batch_id: str, now: datetime, limit: int) -> list[str]:
    """Up to `limit` of a batch's queued messages not on the queue whose time has come.

    In no particular order (sids are random, so no order of theirs is the batch's): with one,
    a planner that has not seen the batch's rows yet (statistics lag a 100,000-row COPY) sorts
    all of them for every task. Without, any index on the batch stops at `limit`."""
    query = (
        select(Message.sid)
        .where(
            Message.batch_id == batch_id,
            _status_is(MessageStatus.QUEUED),
            Message.published_at.is_(None),
            or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now),
        )
        .limit(limit)
    )
    return list(session.scalars(query))


def batch_unsettled(session: Session, batch_id: str) -> bool:
    """Whether any of the batch's messages is still queued or being sent."""
    query = select(
        select(Message.sid)
        .where(
            Message.batch_id == batch_id,
            _status_is(MessageStatus.QUEUED, MessageStatus.SENDING),
        )
        .exists()
    )
    return bool(session.scalar(query))


def finish_batch(session: Session, batch_id: str, now: datetime) -> None:
    session.execute(
        update(BulkBatch)
        .where(BulkBatch.id == batch_id, BulkBatch.finished_at.is_(None))
        .values(finished_at=now)
    )


def mark_bulk_published(session: Session, sids: Sequence[str], now: datetime) -> None:
    """The pump's tasks are on the bulk queue: their messages are no longer due for it."""
    session.execute(
        update(Message)
        .where(
            Message.sid.in_(sids),
            _status_is(MessageStatus.QUEUED),
            Message.published_at.is_(None),
        )
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )


def published_at_of(session: Session, sid: str) -> datetime | None:
    return session.scalar(select(Message.published_at).where(Message.sid == sid))


def outbox_state_locked(session: Session) -> OutboxState | None:
    """The outbox's one row (the broker epoch last seen), locked until the transaction ends."""
    return session.get(OutboxState, 1, with_for_update=True)


def add_outbox_state(session: Session, epoch: str, now: datetime) -> None:
    session.add(OutboxState(id=1, broker_epoch=epoch, updated_at=now))


# Reconciliation


def take_silent(session: Session, quiet_since: datetime, now: datetime, limit: int) -> list[Any]:
    """`sent` or `in_doubt` messages with no word since `quiet_since` and not asked about
    since, oldest first: marked asked in the same transaction, skipping rows another sweep is
    taking, so overlapping sweeps never ask about one message twice."""
    due = (
        select(Message.sid)
        .where(
            _status_is(MessageStatus.SENT, MessageStatus.IN_DOUBT),
            Message.updated_at <= quiet_since,
            or_(Message.reconciled_at.is_(None), Message.reconciled_at <= quiet_since),
        )
        .order_by(Message.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True)
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
    return list(
        session.execute(
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
    )


# The backlog, for metrics


def oldest_queued_created_at(session: Session, timeout: timedelta) -> datetime | None:
    """Since when the longest-waiting single send still `queued` has been due (accepted, or
    its sendAt or retry time come); gives up after `timeout` (the rest of the transaction
    too). A time still ahead (only scheduled ones wait) reads as nothing waiting."""
    statement_timeout(session, timeout)
    return session.scalar(
        select(func.min(func.coalesce(Message.next_attempt_at, Message.created_at))).where(
            _status_is(MessageStatus.QUEUED), Message.batch_id.is_(None)
        )
    )


def statement_timeout(session: Session, timeout: timedelta) -> None:
    """The rest of this transaction's statements give up after `timeout` (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        milliseconds = max(1, int(timeout.total_seconds() * 1000))
        session.execute(text(f"SET LOCAL statement_timeout = {milliseconds}"))


def bulk_backlog(session: Session) -> list[tuple[str, datetime, int]]:
    """Each tenant's bulk messages still `queued`: (tenant id, since when the longest-waiting
    has been due, how many, scheduled ones included). Read from the unfinished batches, each
    through its own index entries."""
    due = func.coalesce(Message.next_attempt_at, BulkBatch.created_at)
    query = (
        select(Account.tenant_id, func.min(due), func.count(Message.sid))
        .select_from(BulkBatch)
        .join(Account, Account.id == BulkBatch.account_id)
        .join(Message, Message.batch_id == BulkBatch.id)
        .where(BulkBatch.finished_at.is_(None), _status_is(MessageStatus.QUEUED))
        .group_by(Account.tenant_id)
    )
    return [(tenant, oldest, count) for tenant, oldest, count in session.execute(query)]


# Provider callbacks


def message_by_sid(session: Session, sid: str) -> Message | None:
    return session.get(Message, sid)


def provider_account_by_id(session: Session, provider_account_id: int) -> ProviderAccount | None:
    return session.get(ProviderAccount, provider_account_id)


_MESSAGES_ESTIMATE = text("SELECT reltuples FROM pg_class WHERE oid = 'messages'::regclass")


def refresh_statistics_after_bulk(session: Session, added: int) -> bool:
    """ANALYZE messages when a bulk batch just added a tenth or more of what PostgreSQL's
    statistics say it holds; whether it did. Autovacuum would, within its naptime, but until
    then every plan counts on the old size: a table its statistics think holds a few rows,
    holding 50,000 new ones, was scanned whole by each claim, each publish mark and each
    foreign key check of a delivery event (16 ms an insert, 75 ms a mark, beside a draining
    batch). Not with a table so large that the batch changes little (PostgreSQL)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    estimated = session.scalar(_MESSAGES_ESTIMATE)  # -1: never analyzed
    if added < max(float(estimated or 0), 0.0) * 0.1:
        return False
    statement_timeout(session, timedelta(minutes=1))
    session.execute(text("ANALYZE messages"))
    return True
