"""The bulk lane's pump (shared/messages/lanes.py) against the real PostgreSQL and Redis: what
it puts on the bulk queue, in which order, and what it leaves."""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select, text, update

from shared.accounts import access, provisioning
from shared.core.broker import BULK_SEND_TASK, bulk_queue, create_celery
from shared.core.db import Database
from shared.core.models import BulkBatch, Campaign, Message, MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.lanes import BulkPump
from shared.messages.outbox import Outbox
from shared.providers.rate_limits import LocalRateLimits
from tests.support.data import OTHER_KEY, OTHER_TENANT, Demo, headers

V3 = "/interact/version/3/account/{tenant}/resources/campaign/sms/{campaign}/bulk"


@pytest.fixture
def lane(migrated: Settings) -> Settings:
    """Tasks of 10 messages, a window of 30 (three tasks)."""
    return migrated.model_copy(update={"bulk_task_size": 10, "bulk_lane_depth": 30})


@pytest.fixture
def celery(lane: Settings) -> Iterator[Celery]:
    app = create_celery(lane)
    yield app
    app.close()


@pytest.fixture
def broker(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _bulk(client: TestClient[Litestar], count: int, *, other: bool = False, first: int = 0) -> str:
    tenant, key, campaign = (
        (OTHER_TENANT, OTHER_KEY, "other-campaign") if other else ("12345678", None, "campaign1")
    )
    url = V3.format(tenant=tenant, campaign=campaign)
    rows = [{"callerId": f"+9725444{first + n:05d}"} for n in range(count)]
    auth = headers(tenant, key) if key else headers()
    response = client.post(url, headers=auth, json=rows)
    assert response.status_code == 202, response.text
    batch_id: str = response.json()["batchId"]
    return batch_id


def _nothing_published(db: Database, broker: redis.Redis, settings: Settings) -> None:
    """Back to before any pump ran (the API pumps right after its 202)."""
    broker.delete(bulk_queue(settings))
    with db.transaction() as session:
        session.execute(update(Message).values(published_at=None))
        session.execute(update(BulkBatch).values(pumped_at=None))


def _tasks(broker: redis.Redis, settings: Settings) -> list[tuple[str, list[str]]]:
    """The bulk queue's tasks, oldest first: (batch id, sids)."""
    tasks = []
    for raw in reversed(broker.lrange(bulk_queue(settings), 0, -1)):  # LPUSHed: newest first
        envelope: dict[str, Any] = json.loads(raw)
        assert envelope["headers"]["task"] == BULK_SEND_TASK
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        tasks.append((args[0], args[1]))
    return tasks


def _published(db: Database, batch_id: str) -> set[str]:
    with db.transaction() as session:
        query = select(Message.sid).where(
            Message.batch_id == batch_id, Message.published_at.is_not(None)
        )
        return set(session.scalars(query))


def test_the_pump_puts_one_window_of_a_batch_on_the_bulk_queue_and_marks_only_that(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 75)
    _nothing_published(db, broker, lane)

    published = BulkPump(celery, db, lane).pump()

    tasks = _tasks(broker, lane)
    assert published == 30
    assert [len(sids) for _, sids in tasks] == [10, 10, 10]
    assert {batch_id for batch_id, _ in tasks} == {batch}
    assert _published(db, batch) == {sid for _, sids in tasks for sid in sids}
    flat = [sid for _, sids in tasks for sid in sids]
    assert len(flat) == len(set(flat)), "a message in two tasks"


def test_the_pump_adds_only_what_the_window_has_room_for(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 75)
    _nothing_published(db, broker, lane)
    pump = BulkPump(celery, db, lane)
    pump.pump()
    broker.rpop(bulk_queue(lane))  # a worker took the oldest task

    assert pump.pump() == 10
    assert pump.pump() == 0  # full again
    assert len(_tasks(broker, lane)) == 3
    assert len(_published(db, batch)) == 40


def test_a_second_tenants_small_batch_is_not_held_behind_a_first_tenants_large_one(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    large = _bulk(client, 200)
    small = _bulk(client, 15, other=True)
    _nothing_published(db, broker, lane)

    BulkPump(celery, db, lane).pump()

    tasks = _tasks(broker, lane)
    # Three tasks of room, two tenants: the small batch's first task is in the first window,
    # though the large one was stored first and is 13 times its size.
    assert sorted(batch_id for batch_id, _ in tasks).count(small) >= 1
    assert sorted(batch_id for batch_id, _ in tasks).count(large) >= 1
    broker.delete(bulk_queue(lane))
    BulkPump(celery, db, lane).pump()
    # The next window: the rest of the small batch, turn about with the large one.
    assert _published(db, small) == _all(db, small)
    assert len(_published(db, large)) in (30, 40)


def test_turns_alternate_between_tenants_task_by_task(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    first = _bulk(client, 100)
    second = _bulk(client, 100, other=True)
    _nothing_published(db, broker, lane)
    wide = lane.model_copy(update={"bulk_lane_depth": 60})

    BulkPump(celery, db, wide).pump()

    order = [batch_id for batch_id, _ in _tasks(broker, wide)]
    assert sorted(order) == sorted([first] * 3 + [second] * 3)
    assert all(a != b for a, b in itertools.pairwise(order))


@pytest.mark.parametrize("tenants", [2, 3])
def test_turns_hold_across_processes_one_task_at_a_time(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
    tenants: int,
) -> None:
    # Each pump a new BulkPump (the API's, each worker's) with room for one task (a lane held
    # to one task at a time, as its rate does): the tenant served longest ago goes next.
    batches = [_bulk(client, 50)]
    batches.append(_bulk(client, 50, other=True))
    if tenants == 3:
        batches.append(_third_tenant_batch(client, db))
    _nothing_published(db, broker, lane)
    narrow = lane.model_copy(update={"bulk_lane_depth": 10})

    order = []
    for _ in range(3 * tenants):
        BulkPump(celery, db, narrow).pump()
        ((batch_id, _),) = _tasks(broker, narrow)
        broker.delete(bulk_queue(narrow))  # a worker took it
        order.append(batch_id)

    assert order == batches * 3


def test_one_tenants_batches_go_oldest_first(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    older = _bulk(client, 25)
    newer = _bulk(client, 25, first=100)
    _nothing_published(db, broker, lane)

    BulkPump(celery, db, lane).pump()

    # 25 of the older (10, 10, 5): its last task is short rather than mixed with the newer.
    assert [(b, len(s)) for b, s in _tasks(broker, lane)] == [(older, 10), (older, 10), (older, 5)]
    assert _published(db, newer) == set()


def test_the_lanes_rate_lets_out_a_tenth_of_a_second_of_it_at_a_time(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 50)
    _nothing_published(db, broker, lane)
    limited = lane.model_copy(update={"bulk_lane_rate": 20.0})
    pump = BulkPump(celery, db, limited, LocalRateLimits())

    first = pump.pump()
    right_after = pump.pump()
    time.sleep(0.15)  # the next slot: 2 messages at 20/s take 0.1 s
    later = pump.pump()

    # Tasks of 2 (a tenth of a second at 20/s), one per free slot, never the window at once.
    assert (first, right_after, later) == (2, 0, 2)
    assert [len(sids) for _, sids in _tasks(broker, limited)] == [2, 2]
    assert len(_published(db, batch)) == 4


def test_with_the_queue_empty_a_workers_pump_waits_for_the_next_slot_and_the_sweeps_does_not(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    _bulk(client, 5)
    _nothing_published(db, broker, lane)
    slow = lane.model_copy(update={"bulk_lane_rate": 2.0})  # tasks of 1, a slot every 0.5 s
    pump = BulkPump(celery, db, slow, LocalRateLimits())
    assert pump.pump() == 1
    broker.delete(bulk_queue(slow))  # a worker took it: nothing else would pump now

    assert pump.pump(wait=False) == 0  # the sweep's: the next sweep comes anyway
    assert pump.pump() == 1  # a worker's: waits for the slot rather than leave the lane idle


def test_a_campaigns_quiet_hours_hold_its_bulk_texts_until_morning_where_each_recipient_is(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    # Israeli recipients (UTC+2) and one in the UK (UTC+0 in December).
    batch = _bulk(client, 3)
    uk = "+447911123456"
    response = client.post(
        V3.format(tenant="12345678", campaign="campaign1"),
        headers=headers(),
        json=[{"callerId": uk}],
    )
    assert response.status_code == 202, response.text
    _nothing_published(db, broker, lane)
    # Quiet hours only now: the API's own pump after each 202 judged them at the real time of
    # day, whatever it was, and this test's pumps judge them at the times it names.
    with db.transaction() as session:
        campaign = session.scalars(select(Campaign).where(Campaign.campaign_id == "campaign1"))
        campaign.one().quiet_hours = "21:00-08:00"
    evening = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)  # 22:00 in Israel, 20:00 in London

    BulkPump(celery, db, lane).pump(evening)

    published = [sid for _, sids in _tasks(broker, lane) for sid in sids]
    with db.transaction() as session:
        rows = {m.to_number: m for m in session.scalars(select(Message))}
    assert published == [rows[uk].sid]
    israeli = [m for number, m in rows.items() if number != uk]
    morning = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)  # 08:00 in Israel
    assert {m.sid for m in israeli} <= {sid for sid in _all(db, batch)}
    assert {m.next_attempt_at for m in israeli} == {morning}
    assert {m.expires_at for m in israeli} == {morning + lane.message_validity}
    assert {m.status for m in israeli} == {"queued"}
    # Deferred, not dropped: in the morning the pump sends them.
    broker.delete(bulk_queue(lane))
    assert BulkPump(celery, db, lane).pump(morning) == len(israeli)


def test_a_message_handed_back_is_published_again_when_due_and_not_before(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 5)
    _nothing_published(db, broker, lane)
    later = utcnow() + timedelta(minutes=1)
    with db.transaction() as session:
        session.execute(
            update(Message).where(Message.batch_id == batch).values(next_attempt_at=later)
        )
    pump = BulkPump(celery, db, lane)

    assert pump.pump() == 0
    assert pump.pump(later + timedelta(seconds=1)) == 5


def test_a_batch_with_nothing_queued_or_being_sent_is_finished_and_looked_at_no_more(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 3)
    pump = BulkPump(celery, db, lane)
    pump.pump()
    with db.transaction() as session:
        session.execute(
            update(Message)
            .where(Message.batch_id == batch)
            .values(status=MessageStatus.DELIVERED.value)
        )

    pump.pump()

    with db.transaction() as session:
        assert session.get(BulkBatch, batch).finished_at is not None  # type: ignore[union-attr]
        assert queries.unfinished_batches(session) == []


def test_a_cancelled_batchs_message_handed_back_later_is_cancelled_not_sent(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 2)
    with db.transaction() as session:
        # One was being sent when the batch was cancelled; it comes back (a rate limit).
        sids = sorted(session.scalars(select(Message.sid).where(Message.batch_id == batch)))
        session.execute(update(Message).where(Message.sid == sids[0]).values(status="sending"))
    cancelled = client.delete(
        V3.format(tenant="12345678", campaign="campaign1") + f"/{batch}", headers=headers()
    )
    assert cancelled.status_code == 200, cancelled.text
    _nothing_published(db, broker, lane)
    with db.transaction() as session:
        session.execute(update(Message).where(Message.sid == sids[0]).values(status="queued"))

    assert BulkPump(celery, db, lane).pump() == 0

    with db.transaction() as session:
        statuses = dict(session.execute(select(Message.sid, Message.status)).all())
    assert statuses == {sids[0]: "cancelled", sids[1]: "cancelled"}
    assert _tasks(broker, lane) == []


def test_a_pump_finding_another_running_publishes_nothing(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    _bulk(client, 5)
    _nothing_published(db, broker, lane)
    with db.transaction() as session:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": 0x5D15_B017})

        assert BulkPump(celery, db, lane).pump() == 0

    assert _tasks(broker, lane) == []


def test_the_sweeper_leaves_a_batchs_queued_messages_to_the_pump(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    _bulk(client, 5)
    _nothing_published(db, broker, lane)
    with db.transaction() as session:
        session.execute(update(Message).values(created_at=utcnow() - timedelta(minutes=10)))

    assert Outbox(celery, db, lane).sweep() == 0
    assert broker.llen(lane.send_queue) == 0


def test_a_bulk_message_whose_worker_died_goes_back_on_the_bulk_lane(
    client: TestClient[Litestar],
    db: Database,
    demo: Demo,
    lane: Settings,
    celery: Celery,
    broker: redis.Redis,
) -> None:
    batch = _bulk(client, 3)
    _nothing_published(db, broker, lane)
    with db.transaction() as session:
        sid = min(session.scalars(select(Message.sid).where(Message.batch_id == batch)))
        # Claimed by a worker that died: its lease ran out.
        session.execute(
            update(Message)
            .where(Message.sid == sid)
            .values(status="sending", lease_expires_at=utcnow() - timedelta(seconds=5))
        )

    assert Outbox(celery, db, lane).sweep() == 1

    assert _tasks(broker, lane) == [(batch, [sid])]
    assert broker.llen(lane.send_queue) == 0


def _all(db: Database, batch_id: str) -> set[str]:
    with db.transaction() as session:
        return set(session.scalars(select(Message.sid).where(Message.batch_id == batch_id)))


def _third_tenant_batch(client: TestClient[Litestar], db: Database) -> str:
    """A bulk batch of a third account's, made here with its own campaign and key."""
    with db.transaction() as session:
        account = provisioning.create_account(session, "55555555", "Third", "PROD")
        provisioning.add_application_key(session, account, THIRD_KEY)
        prod = access.resolve_environment(session, account, None)
        provisioning.upsert_campaign(
            session, prod, "third", name="x", message_text="hello", link_url=None
        )
        provisioning.set_provider(session, account, "simulator", sender_ids=["+12025550144"])
    response = client.post(
        V3.format(tenant="55555555", campaign="third"),
        headers=headers("55555555", THIRD_KEY),
        json=[{"callerId": f"+9725444{n:05d}"} for n in range(50)],
    )
    assert response.status_code == 202, response.text
    batch_id: str = response.json()["batchId"]
    return batch_id


THIRD_KEY = "fedcba9876543210fedcba98"
