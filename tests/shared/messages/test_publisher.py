"""Publishing after the commit: the API's publisher thread, and `publish_sends` beneath it."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import update

from shared.core.broker import SEND_BATCH_TASK, SEND_TASK, RedisTaskQueue, create_celery
from shared.core.db import Database
from shared.core.models import Message, utcnow
from shared.core.settings import Settings
from shared.messages.outbox import Publisher, QueuePublisher, merged, publish_sends
from tests.support.api import SEND_QUEUE, queued_sends
from tests.support.data import Demo
from tests.support.messages import accept_message, load_message
from tests.support.services import free_port
from tests.support.sql import statements


def test_a_batch_is_published_and_marked_in_one_statement(
    db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(3)]

    with statements(db) as sql:
        published = publish_sends(create_celery(migrated), db, sids)

    assert published == sids
    assert all(load_message(db, sid).published_at is not None for sid in sids)
    assert sum(s.lstrip().upper().startswith("UPDATE MESSAGES") for s in sql) == 1
    assert queued_sends(redis_url) == [(SEND_TASK, [sid]) for sid in sids]


def test_submitted_messages_are_published_and_marked_off_the_callers_thread(
    db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(2)]
    publisher = Publisher(create_celery(migrated), db)
    try:
        publisher.submit(sids[:1])
        publisher.submit(sids[1:])
        assert publisher.flush()
    finally:
        publisher.close()

    assert sorted(_sids(queued_sends(redis_url))) == sorted(sids)
    assert all(load_message(db, sid).published_at is not None for sid in sids)


def test_the_publishers_late_mark_leaves_a_newer_mark_alone(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    newer = datetime(2030, 1, 1).astimezone()
    # Meanwhile a worker handed the message back and published it again, with its own mark.
    with db.transaction() as session:
        session.execute(update(Message).where(Message.sid == sid).values(published_at=newer))

    publish_sends(create_celery(migrated), db, [sid], mark_only_unchanged=True)

    assert load_message(db, sid).published_at == newer


def test_the_publishers_late_mark_does_not_hide_a_handed_back_message_from_the_sweeper(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    # A worker claimed it and handed it back (rate limit), clearing the mark, after our publish
    # began: the row changed after that moment.
    later = datetime(2030, 1, 1).astimezone()
    with db.transaction() as session:
        session.execute(
            update(Message).where(Message.sid == sid).values(published_at=None, updated_at=later)
        )

    publish_sends(create_celery(migrated), db, [sid], mark_only_unchanged=True)

    assert load_message(db, sid).published_at is None


def test_after_close_a_submission_is_published_at_once(
    db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    publisher = Publisher(create_celery(migrated), db)
    publisher.close()

    publisher.submit([sid])

    assert queued_sends(redis_url) == [(SEND_TASK, [sid])]
    assert load_message(db, sid).published_at is not None


def test_close_publishes_what_is_still_waiting(
    db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(50)]
    publisher = Publisher(create_celery(migrated), db, max_batch=7)
    for sid in sids:
        publisher.submit([sid])
    publisher.close()

    assert sorted(_sids(queued_sends(redis_url))) == sorted(sids)
    assert all(load_message(db, sid).published_at is not None for sid in sids)


def _sids(tasks: list[tuple[str, list[Any]]]) -> list[str]:
    return [sid for name, args in tasks for sid in ([args[0]] if name == SEND_TASK else args[0])]


def test_merged_puts_small_groups_together_and_splits_only_a_group_too_large() -> None:
    assert merged([["a"], ["b", "c"], ["d"]], 3) == [["a", "b", "c"], ["d"]]
    assert merged([["a"], ["b", "c", "d", "e"]], 3) == [["a"], ["b", "c", "d"], ["e"]]
    assert merged([], 3) == []


def test_the_publisher_thread_sends_what_commits_within_its_window_as_one_task(
    db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    """A lone message after a quiet spell leaves at once; what is submitted while the window
    since that publish runs goes as one task, at most `batch_size` messages each."""
    first, *rest = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(6)]
    publisher = Publisher(create_celery(migrated), db, window=30.0, batch_size=3)
    try:
        publisher.submit([first])
        assert _wait_for_tasks(redis_url, 1, seconds=5) == [(SEND_TASK, [first])]
        for sid in rest:
            publisher.submit([sid])
    finally:
        publisher.close()  # publishes what waits for the window at once

    assert queued_sends(redis_url) == [
        (SEND_TASK, [first]),
        (SEND_BATCH_TASK, [rest[:3]]),
        (SEND_BATCH_TASK, [rest[3:]]),
    ]
    assert all(load_message(db, sid).published_at is not None for sid in [first, *rest])


def _wait_for_tasks(redis_url: str, count: int, seconds: float) -> list[tuple[str, list[Any]]]:
    # Not through queued_sends: its flush would wait for the publisher.
    broker = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + seconds
    try:
        while broker.llen(SEND_QUEUE) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        broker.close()
    return queued_sends(redis_url)


def test_a_broker_outage_leaves_the_rows_unmarked_for_the_sweeper(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    dead = migrated.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    publisher = Publisher(create_celery(dead), db)
    try:
        publisher.submit([sid])
        assert publisher.flush(timeout=30)
    finally:
        publisher.close()

    assert load_message(db, sid).published_at is None


def test_the_queue_publisher_puts_each_group_on_the_queue_as_celery_would(
    migrated: Settings, redis_url: str, db: Database
) -> None:
    """The API's publisher on Redis writes the envelopes itself: a worker must read them as
    it reads `send_task`'s (same task names, args, routing and headers Flower shows)."""
    marked: list[list[str]] = []

    async def run() -> None:
        publisher = QueuePublisher(RedisTaskQueue(migrated), lambda sids, _at: marked.append(sids))
        publisher.submit(["SMone"])
        publisher.submit(["SMa", "SMb"])
        await asyncio.sleep(0)  # both go in the first publish, as one task
        publisher.submit(["SMc", "SMd"])  # waits for that publish, then goes
        await publisher.close()

    asyncio.run(run())

    assert queued_sends(redis_url) == [
        (SEND_BATCH_TASK, [["SMone", "SMa", "SMb"]]),
        (SEND_BATCH_TASK, [["SMc", "SMd"]]),
    ]
    assert sorted(sid for sids in marked for sid in sids) == ["SMa", "SMb", "SMc", "SMd", "SMone"]
    ours = json.loads(redis.Redis.from_url(redis_url).lrange(migrated.send_queue, 0, 0)[0])
    celerys = _celery_envelope(migrated, redis_url)
    assert ours.keys() == celerys.keys()
    assert ours["headers"].keys() == celerys["headers"].keys()
    assert ours["properties"]["delivery_info"] == celerys["properties"]["delivery_info"]
    assert ours["headers"]["argsrepr"] == "[['SMc', 'SMd']]"


def test_the_queue_publisher_sends_a_lone_message_at_once_and_the_next_ones_together(
    migrated: Settings, redis_url: str
) -> None:
    """With a window, a message after a quiet spell waits for nothing; the groups committed
    within the window after that publish wait for its end and go as one task."""
    window = 0.5
    published_at: dict[str, float] = {}
    redis.Redis.from_url(redis_url).delete(migrated.send_queue)  # another test's tasks

    def mark(sids: list[str], _at: datetime) -> None:
        published_at.update(dict.fromkeys(sids, time.monotonic()))

    async def run() -> float:
        publisher = QueuePublisher(RedisTaskQueue(migrated), mark, window=window, batch_size=10)
        started = time.monotonic()
        publisher.submit(["SMalone"])
        for i in range(5):
            await asyncio.sleep(0.02)
            publisher.submit([f"SM{i}"])
        while len(published_at) < 6 and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        await publisher.close()
        return started

    started = asyncio.run(run())

    assert published_at["SMalone"] - started < window / 2
    tasks = queued_sends(redis_url)
    assert tasks[0] == (SEND_TASK, ["SMalone"])
    assert [len(args[0]) for _, args in tasks[1:]] == [5]
    assert min(at for sid, at in published_at.items() if sid != "SMalone") - started >= window


def test_the_queue_publisher_does_not_hold_a_full_task_for_the_window(
    migrated: Settings, redis_url: str
) -> None:
    """A task's worth of messages waiting ends the window's wait: under a burst the window
    only ever merges, it never holds back a full task."""
    window = 30.0
    published: list[list[str]] = []
    redis.Redis.from_url(redis_url).delete(migrated.send_queue)  # another test's tasks

    async def run() -> float:
        publisher = QueuePublisher(
            RedisTaskQueue(migrated),
            lambda sids, _at: published.append(sids),
            window=window,
            batch_size=3,
        )
        publisher.submit(["SMalone"])
        while not published:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        for i in range(3):
            publisher.submit([f"SM{i}"])
            await asyncio.sleep(0.01)
        while len(published) < 2 and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        await publisher.close()
        return took

    took = asyncio.run(run())

    assert took < 5
    assert published == [["SMalone"], ["SM0", "SM1", "SM2"]]
    assert [args for _, args in queued_sends(redis_url)] == [["SMalone"], [["SM0", "SM1", "SM2"]]]


def _celery_envelope(settings: Settings, redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    client.delete(settings.send_queue)
    create_celery(settings).send_task(SEND_BATCH_TASK, args=[["SMx"]])
    envelope: dict[str, Any] = json.loads(client.lpop(settings.send_queue))  # type: ignore[arg-type]
    return envelope


def test_the_queue_publisher_leaves_to_the_sweeper_what_the_broker_did_not_take(
    migrated: Settings,
) -> None:
    """Breaks: the broker is not there (nothing listens on its port). Nothing is marked, so
    the sweeper publishes the messages later; the publisher goes on with the next group."""
    unreachable = migrated.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    marked: list[list[str]] = []

    async def run() -> None:
        publisher = QueuePublisher(
            RedisTaskQueue(unreachable), lambda sids, _at: marked.append(sids)
        )
        publisher.submit(["SMlost"])
        for _ in range(200):  # gives up on it (not stuck), within seconds
            if publisher.flush(0):
                break
            await asyncio.sleep(0.05)
        assert publisher.flush(0)
        publisher.submit(["SMnext"])  # and takes the next group
        await publisher.close()
        assert publisher.flush(0)

    asyncio.run(run())

    assert marked == []
