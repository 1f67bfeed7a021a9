"""The API marks published messages in batches, off the request path; a late mark never
overwrites a newer one."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update

from shared.db import Database
from shared.models import Message
from shared.settings import Settings
from tests.conftest import Demo, wait_until
from tests.shared.directory_support import statements
from tests.shared.support import accept_message, load_message
from worker.queue import PublishMarks


def test_marks_of_several_publishes_are_written_in_one_statement(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    now = datetime.now().astimezone()
    sids = [accept_message(db, migrated, now, with_token=False) for _ in range(3)]
    marks = PublishMarks(db, interval=timedelta(hours=1))  # written only by close()
    for sid in sids:
        marks.add([sid])
    assert all(load_message(db, sid).published_at is None for sid in sids)

    with statements(db) as sql:
        marks.close()

    assert all(load_message(db, sid).published_at is not None for sid in sids)
    assert sum(s.lstrip().upper().startswith("UPDATE MESSAGES") for s in sql) == 1


def test_a_mark_is_written_within_its_interval_without_close(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, datetime.now().astimezone(), with_token=False)
    marks = PublishMarks(db, interval=timedelta(milliseconds=20))
    marks.add([sid])
    try:
        wait_until(lambda: load_message(db, sid).published_at is not None, 5, "the mark")
    finally:
        marks.close()


def test_a_late_mark_leaves_a_newer_mark_alone(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, datetime.now().astimezone(), with_token=False)
    newer = datetime(2030, 1, 1).astimezone()
    marks = PublishMarks(db, interval=timedelta(hours=1))
    marks.add([sid])
    # Meanwhile a worker handed the message back and published it again, with its own mark.
    with db.transaction() as session:
        session.execute(update(Message).where(Message.sid == sid).values(published_at=newer))
    marks.close()

    assert load_message(db, sid).published_at == newer


def test_after_close_marks_are_written_at_once(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, datetime.now().astimezone(), with_token=False)
    marks = PublishMarks(db)
    marks.close()
    marks.add([sid])

    assert load_message(db, sid).published_at is not None
