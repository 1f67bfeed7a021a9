"""Provider callbacks applied in groups (shared/messages/callback_groups.py): what arrives
together shares one transaction, and each callback is answered as it would be alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.errors import database_unavailable
from shared.core.db import AsyncDatabase, AsyncTransaction, Database
from shared.core.models import MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages.callback_groups import CallbackGroups
from shared.messages.claims import claim, record_accepted
from shared.messages.lifecycle import StatusReport, apply_status
from tests.support.data import Demo
from tests.support.messages import accept_message, count_events, load_events, load_message


class CountingDatabase(AsyncDatabase):
    """The API's async engine, counting the transactions it begins."""

    transactions = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        self.transactions += 1
        async with super().transaction() as transaction:
            yield transaction


def sent_message(db: Database, settings: Settings, provider_id: str) -> str:
    """A message the worker handed to the simulator, which answered `provider_id`."""
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        owned = claim(session, sid, settings, now)
        assert owned is not None
        record_accepted(session, owned, provider_id, "queued", now)
    return sid


def callback(sid: str, status: MessageStatus, key: str) -> Callable[[Session], bool]:
    """A callback's work as api/webhooks.py does it: one status report, stored once."""

    def work(session: Session) -> bool:
        report = StatusReport(status, source="callback", provider="simulator")
        return apply_status(session, sid, report, utcnow(), dedupe_key=key)

    return work


def in_one_group(
    db: Database,
    settings: Settings,
    works: list[tuple[Callable[[Session], Any], str | None]],
) -> tuple[list[Any], int]:
    """Submit every work at once (so they gather into one group) and return each one's
    result or exception, and how many transactions the groups began."""

    async def main() -> tuple[list[Any], int]:
        database = CountingDatabase(settings, db.config_cache)
        groups = CallbackGroups(database)
        try:
            calls: list[Coroutine[Any, Any, Any]] = [
                groups.apply(work, message_sid=sid) for work, sid in works
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            await groups.close()
            return list(results), database.transactions
        finally:
            await database.dispose()

    return asyncio.run(main())


def test_callbacks_that_arrive_together_are_applied_in_one_transaction(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sids = [sent_message(db, migrated, f"SIM-{n}") for n in range(5)]
    results, transactions = in_one_group(
        db,
        migrated,
        [(callback(sid, MessageStatus.DELIVERED, f"key-{sid}"), sid) for sid in sids],
    )
    assert results == [True] * 5
    assert transactions == 1
    assert {load_message(db, sid).status for sid in sids} == {"delivered"}


def test_callbacks_for_one_message_out_of_order_in_one_group_end_in_the_later_status(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    """`delivered` overtook `sent` (or came first in the group): the message ends delivered,
    and both are stored, the late `sent` as not applied."""
    sid = sent_message(db, migrated, "SIM-1")
    other = sent_message(db, migrated, "SIM-2")
    results, _ = in_one_group(
        db,
        migrated,
        [
            (callback(sid, MessageStatus.DELIVERED, "d1"), sid),
            (callback(other, MessageStatus.SENT, "s2"), other),
            (callback(sid, MessageStatus.SENT, "s1"), sid),
            (callback(other, MessageStatus.DELIVERED, "d2"), other),
        ],
    )
    assert results == [True, False, False, True]
    assert load_message(db, sid).status == "delivered"
    assert load_message(db, other).status == "delivered"
    events = [(e.status, e.applied) for e in load_events(db, sid) if e.source == "callback"]
    assert events == [("delivered", True), ("sent", False)]


def test_a_repeated_callback_in_the_same_group_is_stored_once(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = sent_message(db, migrated, "SIM-1")
    before = count_events(db)
    results, _ = in_one_group(
        db,
        migrated,
        [(callback(sid, MessageStatus.DELIVERED, "same"), sid) for _ in range(3)],
    )
    assert results == [True, False, False]
    assert count_events(db) == before + 1


class BadData(Exception):
    """What a callback's own work may raise: a refusal, or data the database will not take."""


def test_a_callback_that_raises_changes_nothing_and_the_rest_of_its_group_is_applied(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sids = [sent_message(db, migrated, f"SIM-{n}") for n in range(3)]
    bad = sids[1]

    def bad_work(session: Session) -> bool:
        callback(bad, MessageStatus.DELIVERED, "bad")(session)  # written, then taken back
        raise BadData("refused")

    def refused_by_the_database(session: Session) -> None:
        session.execute(text("SELECT 1 / 0"))

    results, transactions = in_one_group(
        db,
        migrated,
        [
            (callback(sids[0], MessageStatus.DELIVERED, "k0"), sids[0]),
            (bad_work, bad),
            (refused_by_the_database, None),
            (callback(sids[2], MessageStatus.DELIVERED, "k2"), sids[2]),
        ],
    )
    # Sorted by messageSid in the group; each answer still goes to its own caller.
    assert results[0] is True
    assert results[3] is True
    assert isinstance(results[1], BadData)
    assert not database_unavailable(results[2])  # a bug's 500, as alone
    assert transactions == 2  # the group, then again with savepoints
    assert load_message(db, sids[0]).status == "delivered"
    assert load_message(db, bad).status == "sent"
    assert [e for e in load_events(db, bad) if e.source == "callback"] == []
    assert load_message(db, sids[2]).status == "delivered"


def test_a_database_lost_mid_group_answers_every_callback_unavailable_and_writes_nothing(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    """The server ends the group's session: every callback of the group gets the error a
    callback alone got (503, so the provider retries), and none of them is applied."""
    sids = [sent_message(db, migrated, f"SIM-{n}") for n in range(3)]

    def connection_lost(session: Session) -> None:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    before = count_events(db)
    results, _ = in_one_group(
        db,
        migrated,
        [(callback(sid, MessageStatus.DELIVERED, f"k-{sid}"), sid) for sid in sids]
        + [(connection_lost, "SM" + "f" * 32)],
    )
    assert all(isinstance(result, Exception) for result in results), results
    assert all(database_unavailable(result) for result in results), results
    assert {load_message(db, sid).status for sid in sids} == {"sent"}
    assert count_events(db) == before


@pytest.mark.parametrize("count", [1, 300])
def test_every_callback_is_answered_whatever_the_group_size(
    db: Database, demo: Demo, migrated: Settings, count: int
) -> None:
    sid = sent_message(db, migrated, "SIM-1")
    results, transactions = in_one_group(
        db,
        migrated,
        [(callback(sid, MessageStatus.DELIVERED, f"k{n}"), sid) for n in range(count)],
    )
    assert results[0] is True
    assert results[1:] == [False] * (count - 1)
    assert transactions == (1 if count == 1 else 2)  # at most 256 callbacks per group
