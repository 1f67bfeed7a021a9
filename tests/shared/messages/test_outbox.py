"""due_for_publish: what the sweeper must (re-)publish, at a `now` the test chooses."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from shared.core.db import Database
from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.messages.claims import (
    claim,
    record_accepted,
    schedule_retry,
)
from shared.messages.lifecycle import StatusReport, apply_status
from shared.messages.outbox import due_for_publish, mark_published, note_broker_epoch
from shared.providers.interface import TransientProviderError
from tests.support.data import Demo
from tests.support.messages import accept_message

TICK = timedelta(milliseconds=1)
SECOND = timedelta(seconds=1)


@pytest.fixture
def sid(db: Database, demo: Demo, settings: Settings, t0: datetime) -> str:
    return accept_message(db, settings, t0)


def due(db: Database, settings: Settings, now: datetime) -> list[str]:
    with db.transaction() as session:
        due = due_for_publish(session, settings, now)
    assert all(batch_id is None for _, batch_id in due)  # single sends, all of them
    return [sid for sid, _ in due]


def publish(db: Database, sid: str, now: datetime) -> None:
    with db.transaction() as session:
        mark_published(session, [sid], now)


def take(db: Database, sid: str, settings: Settings, now: datetime) -> None:
    with db.transaction() as session:
        assert claim(session, sid, settings, now) is not None


def test_never_published_message_is_not_due_before_sweep_unpublished_after(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    assert due(db, settings, t0 + settings.sweep_unpublished_after - TICK) == []


def test_never_published_message_is_due_after_sweep_unpublished_after(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    assert due(db, settings, t0 + settings.sweep_unpublished_after) == [sid]


def test_published_message_is_never_due_however_long_it_waits_on_the_queue(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    # A backlog is not a loss: re-publishing it would only grow the queue.
    publish(db, sid, t0)
    assert due(db, settings, t0 + timedelta(days=1)) == []


def epoch(db: Database, value: str, born: datetime, now: datetime) -> int:
    with db.transaction() as session:
        return note_broker_epoch(session, value, born, now)


def test_first_broker_epoch_republishes_nothing(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    publish(db, sid, t0)
    assert epoch(db, "a", t0 + SECOND, t0 + SECOND) == 0
    assert due(db, settings, t0 + timedelta(hours=1)) == []


def test_same_broker_epoch_republishes_nothing(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    epoch(db, "a", t0, t0)
    publish(db, sid, t0 + SECOND)
    assert epoch(db, "a", t0, t0 + 2 * SECOND) == 0
    assert due(db, settings, t0 + timedelta(hours=1)) == []


def test_new_broker_epoch_republishes_what_was_published_before_it_once(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    epoch(db, "a", t0, t0)
    publish(db, sid, t0 + SECOND)
    # The broker came back empty: its new epoch was born after the message was published.
    assert epoch(db, "b", t0 + 2 * SECOND, t0 + 3 * SECOND) == 1
    now = t0 + 3 * SECOND + settings.sweep_unpublished_after
    assert due(db, settings, now) == [sid]
    publish(db, sid, now)
    assert epoch(db, "b", t0 + 2 * SECOND, now + SECOND) == 0
    assert due(db, settings, now + timedelta(hours=1)) == []


def test_new_broker_epoch_leaves_what_was_published_to_the_new_broker(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    epoch(db, "a", t0, t0)
    publish(db, sid, t0 + 3 * SECOND)
    assert epoch(db, "b", t0 + 2 * SECOND, t0 + 4 * SECOND) == 0
    assert due(db, settings, t0 + timedelta(hours=1)) == []


def test_sending_message_with_a_live_lease_is_not_due(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    publish(db, sid, t0)
    take(db, sid, settings, t0 + SECOND)
    assert due(db, settings, t0 + SECOND + settings.send_lease - TICK) == []


def test_sending_message_whose_lease_expired_is_due(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    publish(db, sid, t0)
    take(db, sid, settings, t0 + SECOND)
    assert due(db, settings, t0 + SECOND + settings.send_lease) == [sid]


def test_sending_message_republished_after_its_lease_expired_is_not_due_again(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    publish(db, sid, t0)
    take(db, sid, settings, t0 + SECOND)
    expired = t0 + SECOND + settings.send_lease
    publish(db, sid, expired)
    assert due(db, settings, expired) == []


def test_never_published_message_is_not_due_again_after_mark_published(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    now = t0 + settings.sweep_unpublished_after
    assert due(db, settings, now) == [sid]
    publish(db, sid, now)
    assert due(db, settings, now) == []


def test_sent_message_is_not_due(db: Database, sid: str, settings: Settings, t0: datetime) -> None:
    with db.transaction() as session:
        owned = claim(session, sid, settings, t0)
        assert owned is not None
        record_accepted(session, owned, "SIM-1", "queued", t0)
    assert due(db, settings, t0 + timedelta(days=1)) == []


@pytest.mark.parametrize("status", [s for s in MessageStatus if s.is_final])
def test_final_message_is_not_due(
    db: Database, sid: str, settings: Settings, t0: datetime, status: MessageStatus
) -> None:
    with db.transaction() as session:
        apply_status(session, sid, StatusReport(status, source="worker"), t0)
    assert due(db, settings, t0 + timedelta(days=1)) == []


def test_message_waiting_for_its_retry_is_not_due_before_next_attempt_at(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    with db.transaction() as session:
        owned = claim(session, sid, settings, t0)
        assert owned is not None
        delay = schedule_retry(session, owned, TransientProviderError("503", "busy"), settings, t0)
    assert delay is not None
    assert due(db, settings, t0 + delay - TICK) == []


def test_message_waiting_for_its_retry_is_due_at_next_attempt_at(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    with db.transaction() as session:
        owned = claim(session, sid, settings, t0)
        assert owned is not None
        delay = schedule_retry(session, owned, TransientProviderError("503", "busy"), settings, t0)
    assert delay is not None
    assert due(db, settings, t0 + max(delay, settings.sweep_unpublished_after)) == [sid]


def test_long_retry_waits_in_the_database_and_is_due_only_at_next_attempt_at(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    slow = settings.model_copy(
        update={
            "retry_backoff_base": timedelta(minutes=20),
            "retry_backoff_max": timedelta(hours=1),
        }
    )
    with db.transaction() as session:
        owned = claim(session, sid, slow, t0)
        assert owned is not None
        delay = schedule_retry(session, owned, TransientProviderError("503", "busy"), slow, t0)
    assert delay is not None
    assert due(db, slow, t0 + delay - TICK) == []
    assert due(db, slow, t0 + delay) == [sid]


def test_due_messages_come_oldest_first(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    newer = accept_message(db, settings, t0 + SECOND)
    older = accept_message(db, settings, t0)
    assert due(db, settings, t0 + timedelta(minutes=1)) == [older, newer]


def test_due_for_publish_returns_at_most_sweep_batch_size(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    sids = [accept_message(db, settings, t0 + n * TICK, with_token=False) for n in range(3)]
    small = settings.model_copy(update={"sweep_batch_size": 2})
    assert due(db, small, t0 + timedelta(minutes=1)) == sids[:2]
