"""apply_status: the one place a message's status moves, always forwards, always recorded."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text

from shared.core.db import Database
from shared.core.models import InteractionToken, Message, MessageStatus
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.lifecycle import StatusReport, _event_columns, apply_status
from tests.support.data import Demo
from tests.support.messages import (
    accept_message,
    count_events,
    load_deflected_call,
    load_events,
    load_message,
)

S = MessageStatus
FINAL_STATUSES = [s for s in MessageStatus if s.is_final]
SECOND = timedelta(seconds=1)


def report(status: MessageStatus, provider_message_id: str | None = None) -> StatusReport:
    return StatusReport(
        status, source="callback", provider="simulator", provider_message_id=provider_message_id
    )


def apply(db: Database, sid: str | None, status: MessageStatus, now: datetime) -> bool:
    with db.transaction() as session:
        return apply_status(session, sid, report(status), now)


@pytest.fixture
def sid(db: Database, demo: Demo, settings: Settings, t0: datetime) -> str:
    return accept_message(db, settings, t0)


def test_accepted_message_starts_queued(db: Database, sid: str) -> None:
    assert load_message(db, sid).status == S.QUEUED


def test_status_moves_forwards_queued_sending_sent_delivered(
    db: Database, sid: str, t0: datetime
) -> None:
    seen = []
    for offset, status in enumerate([S.SENDING, S.SENT, S.DELIVERED], start=1):
        assert apply(db, sid, status, t0 + offset * SECOND) is True
        seen.append(load_message(db, sid).status)
    assert seen == ["sending", "sent", "delivered"]


def test_delivered_sets_sent_at_delivered_at_and_final_at(
    db: Database, sid: str, t0: datetime
) -> None:
    apply(db, sid, S.SENT, t0 + SECOND)
    apply(db, sid, S.DELIVERED, t0 + 2 * SECOND)
    message = load_message(db, sid)
    assert (message.sent_at, message.delivered_at, message.final_at) == (
        t0 + SECOND,
        t0 + 2 * SECOND,
        t0 + 2 * SECOND,
    )


def test_sent_after_delivered_is_recorded_but_not_applied(
    db: Database, sid: str, t0: datetime
) -> None:
    apply(db, sid, S.DELIVERED, t0 + SECOND)
    assert apply(db, sid, S.SENT, t0 + 2 * SECOND) is False
    assert load_message(db, sid).status == S.DELIVERED
    last = load_events(db, sid)[-1]
    assert (last.status, last.applied) == ("sent", False)


def test_sent_after_delivered_keeps_the_timestamps(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.DELIVERED, t0 + SECOND)
    apply(db, sid, S.SENT, t0 + 2 * SECOND)
    message = load_message(db, sid)
    assert (message.sent_at, message.delivered_at) == (t0 + SECOND, t0 + SECOND)


def test_earlier_status_never_replaces_a_later_one(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENT, t0 + SECOND)
    assert apply(db, sid, S.SENDING, t0 + 2 * SECOND) is False
    assert apply(db, sid, S.QUEUED, t0 + 3 * SECOND) is False
    assert load_message(db, sid).status == S.SENT


def test_repeating_the_current_status_is_not_applied(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENT, t0 + SECOND)
    assert apply(db, sid, S.SENT, t0 + 2 * SECOND) is False
    assert load_message(db, sid).sent_at == t0 + SECOND


@pytest.mark.parametrize("later", list(MessageStatus))
@pytest.mark.parametrize("final", [S.DELIVERED, S.FAILED])
def test_final_status_is_never_replaced(
    db: Database, sid: str, t0: datetime, final: MessageStatus, later: MessageStatus
) -> None:
    apply(db, sid, final, t0 + SECOND)
    assert apply(db, sid, later, t0 + 2 * SECOND) is False
    message = load_message(db, sid)
    assert (message.status, message.final_at) == (final.value, t0 + SECOND)


def test_failed_keeps_its_error_when_a_later_report_is_ignored(
    db: Database, sid: str, t0: datetime
) -> None:
    with db.transaction() as session:
        apply_status(
            session,
            sid,
            StatusReport(S.FAILED, source="worker", error_code="30003", error_message="dead"),
            t0 + SECOND,
        )
        apply_status(
            session, sid, StatusReport(S.UNDELIVERED, source="callback", error_code="1"), t0
        )
    message = load_message(db, sid)
    assert (message.status, message.error_code, message.error_message) == (
        "failed",
        "30003",
        "dead",
    )


def test_delivered_while_still_sending_is_applied(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENDING, t0 + SECOND)
    assert apply(db, sid, S.DELIVERED, t0 + 2 * SECOND) is True
    message = load_message(db, sid)
    assert message.status == S.DELIVERED
    assert message.sent_at == t0 + 2 * SECOND
    assert message.delivered_at == t0 + 2 * SECOND


def test_reaching_sent_releases_the_lease(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENDING, t0 + SECOND)
    apply(db, sid, S.SENT, t0 + 2 * SECOND)
    assert load_message(db, sid).lease_expires_at is None


def test_provider_message_id_is_kept_from_the_first_report_that_carries_one(
    db: Database, sid: str, t0: datetime
) -> None:
    with db.transaction() as session:
        apply_status(session, sid, report(S.SENT, provider_message_id="first"), t0)
        apply_status(session, sid, report(S.DELIVERED, provider_message_id="second"), t0)
    assert load_message(db, sid).provider_message_id == "first"


def test_every_call_writes_a_delivery_event(db: Database, sid: str, t0: datetime) -> None:
    statuses = [S.SENDING, S.SENT, S.SENDING, S.DELIVERED, S.SENT, S.FAILED, S.DELIVERED]
    for offset, status in enumerate(statuses, start=1):
        apply(db, sid, status, t0 + offset * SECOND)
    events = load_events(db, sid)
    assert [(e.status, e.applied) for e in events] == [
        ("sending", True),
        ("sent", True),
        ("sending", False),
        ("delivered", True),
        ("sent", False),
        ("failed", False),
        ("delivered", False),
    ]


def test_delivery_event_keeps_what_the_source_reported(
    db: Database, sid: str, t0: datetime
) -> None:
    with db.transaction() as session:
        apply_status(
            session,
            sid,
            StatusReport(
                S.UNDELIVERED,
                source="callback",
                provider="simulator",
                provider_status="undelivered",
                provider_message_id="SIM1",
                error_code="30005",
                payload={"status": "undelivered", "id": "SIM1"},
            ),
            t0 + SECOND,
        )
    (event,) = load_events(db, sid)
    assert (
        event.source,
        event.status,
        event.provider,
        event.provider_status,
        event.provider_message_id,
        event.error_code,
        event.applied,
        event.payload,
        event.created_at,
    ) == (
        "callback",
        "undelivered",
        "simulator",
        "undelivered",
        "SIM1",
        "30005",
        True,
        {"status": "undelivered", "id": "SIM1"},
        t0 + SECOND,
    )


def test_report_for_unknown_sid_is_stored_unmatched(db: Database, demo: Demo, t0: datetime) -> None:
    assert apply(db, "SM" + "0" * 32, S.DELIVERED, t0) is False
    (event,) = load_events(db, None)
    assert (event.message_sid, event.status, event.applied) == (None, "delivered", False)


def test_report_without_sid_is_stored_unmatched(db: Database, demo: Demo, t0: datetime) -> None:
    assert apply(db, None, S.SENT, t0) is False
    assert [e.status for e in load_events(db, None)] == ["sent"]
    assert count_events(db) == 1


def test_deflected_call_is_not_sms_sent_while_queued(db: Database, sid: str) -> None:
    call = load_deflected_call(db, sid)
    assert (call.sms_sent, call.sms_sent_at, call.sms_delivered_at) == (False, None, None)


def test_deflected_call_is_not_sms_sent_while_sending(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENDING, t0 + SECOND)
    assert load_deflected_call(db, sid).sms_sent is False


def test_sent_marks_the_deflected_call_sms_sent(db: Database, sid: str, t0: datetime) -> None:
    apply(db, sid, S.SENT, t0 + SECOND)
    call = load_deflected_call(db, sid)
    assert (call.sms_sent, call.sms_sent_at, call.sms_delivered_at) == (True, t0 + SECOND, None)
    assert (call.last_message_sid, call.campaign_id) == (sid, "campaign1")


def test_delivered_sets_sms_delivered_at_and_keeps_sms_sent_at(
    db: Database, sid: str, t0: datetime
) -> None:
    apply(db, sid, S.SENT, t0 + SECOND)
    apply(db, sid, S.DELIVERED, t0 + 2 * SECOND)
    call = load_deflected_call(db, sid)
    assert (call.sms_sent, call.sms_sent_at, call.sms_delivered_at) == (
        True,
        t0 + SECOND,
        t0 + 2 * SECOND,
    )


def test_delivered_without_sent_marks_the_deflected_call_sent_and_delivered(
    db: Database, sid: str, t0: datetime
) -> None:
    apply(db, sid, S.DELIVERED, t0 + SECOND)
    call = load_deflected_call(db, sid)
    assert (call.sms_sent, call.sms_sent_at, call.sms_delivered_at) == (
        True,
        t0 + SECOND,
        t0 + SECOND,
    )


@pytest.mark.parametrize("status", [S.FAILED, S.UNDELIVERED, S.EXPIRED, S.REJECTED])
def test_failure_does_not_mark_the_deflected_call_sent(
    db: Database, sid: str, t0: datetime, status: MessageStatus
) -> None:
    apply(db, sid, status, t0 + SECOND)
    assert load_deflected_call(db, sid).sms_sent is False


def test_ignored_sent_does_not_mark_the_deflected_call(
    db: Database, sid: str, t0: datetime
) -> None:
    apply(db, sid, S.FAILED, t0 + SECOND)
    apply(db, sid, S.SENT, t0 + 2 * SECOND)
    assert load_deflected_call(db, sid).sms_sent is False


def test_message_without_token_touches_no_deflected_call(
    db: Database, demo: Demo, settings: Settings, t0: datetime, sid: str
) -> None:
    tokenless = accept_message(db, settings, t0, with_token=False)
    assert load_message(db, tokenless).token_id is None
    assert apply(db, tokenless, S.DELIVERED, t0 + SECOND) is True
    assert load_deflected_call(db, sid).sms_sent is False


def test_a_call_with_several_sms_keeps_its_firsts_its_latest_sid_and_a_count(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    token = load_deflected_call_token(db, sid)
    second = accept_message(db, settings, t0, jp_token=token)
    apply(db, sid, S.SENT, t0 + SECOND)
    apply(db, sid, S.DELIVERED, t0 + 2 * SECOND)
    apply(db, second, S.DELIVERED, t0 + 3 * SECOND)  # its receipt overtook its "sent"
    apply(db, second, S.SENT, t0 + 4 * SECOND)  # late, ignored, and not counted again
    call = load_deflected_call(db, sid)
    assert (call.sms_count, call.last_message_sid) == (2, second)
    assert (call.sms_sent_at, call.sms_delivered_at) == (t0 + SECOND, t0 + 2 * SECOND)


def load_deflected_call_token(db: Database, sid: str) -> str:
    with db.transaction() as session:
        return session.execute(
            select(InteractionToken.token)
            .join(Message, Message.token_id == InteractionToken.id)
            .where(Message.sid == sid)
        ).scalar_one()


def test_events_stored_in_batches_are_stored_as_one_at_a_time(
    db: Database, sid: str, t0: datetime
) -> None:
    """The batch paths (a worker's sends, a group of callbacks) bind arrays instead of rows:
    each column, the payload (a document, JSON null, unicode) and the time must come out as
    the one-row path writes them."""
    reports = [
        StatusReport(
            S.SENT,
            source="worker",
            provider="simulator",
            provider_message_id="SIM1",
            payload={"id": "SIM1", "text": "Grüße ✓", "n": [1, 2.5, None]},
        ),
        StatusReport(S.FAILED, source="callback", provider="twilio", error_code="30005"),
    ]
    one_by_one = [
        _event_columns(sid, each, False, t0 + SECOND, f"one-{i}") for i, each in enumerate(reports)
    ]
    batched = [
        _event_columns(sid, each, False, t0 + SECOND, f"batch-{i}")
        for i, each in enumerate(reports)
    ]
    plain = [_event_columns(sid, each, True, t0 + SECOND) for each in reports]
    with db.transaction() as session:
        for row in one_by_one:
            queries.store_event(session, row)
        queries.store_events_once(session, batched + batched[:1])  # a repeat: stored once
        queries.store_events_fast(session, plain)

    with db.transaction() as session:
        stored = session.execute(
            text(
                "SELECT dedupe_key, message_sid, source, status, provider, provider_message_id,"
                " provider_status, error_code, applied, payload::text AS payload, created_at"
                " FROM delivery_events ORDER BY id"
            )
        ).all()
    rows = [row._asdict() for row in stored]
    keys = [row.pop("dedupe_key") for row in rows]
    assert keys == ["one-0", "one-1", "batch-0", "batch-1", None, None]
    assert rows[2:4] == rows[0:2]
    assert rows[4:6] == [{**row, "applied": True} for row in rows[0:2]]
    assert rows[0]["created_at"] == t0 + SECOND
