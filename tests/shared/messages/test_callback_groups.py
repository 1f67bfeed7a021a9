"""Provider callbacks applied in groups (shared/messages/callback_groups.py): what arrives
together shares one transaction, and each callback is answered as it would be alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.errors import database_unavailable
from shared.core.db import AsyncDatabase, AsyncTransaction, Database
from shared.core.models import MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages.callback_groups import GROUP_SIZE, CallbackGroups
from shared.messages.claims import claim, record_accepted
from shared.messages.lifecycle import (
    StatusMove,
    StatusReport,
    apply_status,
    apply_status_batch,
    sent_from_sending_batch,
)
from shared.messages.queries import callback_targets
from shared.providers.simulator import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.api import simulator_credentials
from tests.support.data import TENANT, Demo
from tests.support.messages import (
    accept_message,
    count_events,
    load_deflected_call,
    load_events,
    load_message,
)


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
        groups = CallbackGroups(database, settings)
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
    # At most GROUP_SIZE callbacks per group, so 300 take several transactions.
    assert transactions == -(-count // GROUP_SIZE)


# The set-based way (lifecycle.apply_status_batch) against `apply_status` one by one.

Step = tuple[int, MessageStatus, str, str | None, str | None]  # message, status, key, pmid, error

STEPS: list[Step] = [
    (0, MessageStatus.SENT, "a", "P0", None),
    (0, MessageStatus.DELIVERED, "b", "P0", None),
    (1, MessageStatus.DELIVERED, "c", None, None),  # overtook its `sent`
    (1, MessageStatus.SENT, "d", None, None),
    (2, MessageStatus.UNDELIVERED, "e", None, "30005"),
    (2, MessageStatus.DELIVERED, "f", None, None),  # never moves a final status back
    (0, MessageStatus.DELIVERED, "b", "P0", None),  # a repeat
    (3, MessageStatus.SENT, "g", "P3", None),  # still `sending`: the worker's record is late
    (3, MessageStatus.UNDELIVERED, "h", "P3", "30003"),
    (4, MessageStatus.FAILED, "i", None, "30008"),  # claimed, then failed at the provider
]


def messages_for_steps(db: Database, settings: Settings) -> list[str]:
    sids = [sent_message(db, settings, f"SIM-{n}") for n in range(3)]
    for _ in range(2):  # claimed, the provider's answer not yet recorded
        now = utcnow()
        sid = accept_message(db, settings, now)
        with db.transaction() as session:
            assert claim(session, sid, settings, now) is not None
        sids.append(sid)
    return sids


def report_of(step: Step) -> StatusReport:
    _, status, _, provider_id, error = step
    return StatusReport(
        status,
        source="callback",
        provider="simulator",
        provider_status=status.value,
        provider_message_id=provider_id,
        error_code=error,
        payload={"status": status.value},
    )


def outcome(db: Database, sids: list[str]) -> list[Any]:
    """What the steps left, without the clocks' values."""
    seen = []
    for sid in sids:
        message = load_message(db, sid)
        call = load_deflected_call(db, sid)
        seen.append(
            (
                message.status,
                message.provider_message_id,
                message.error_code,
                message.error_message,
                message.sent_at is not None,
                message.delivered_at is not None,
                message.final_at is not None,
                message.lease_expires_at is not None,
                [
                    (e.status, e.applied, e.provider_status, e.error_code, e.dedupe_key)
                    for e in load_events(db, sid)
                    if e.source == "callback"
                ],
                (call.sms_sent, call.sms_count, call.sms_delivered_at is not None),
                call.last_message_sid == sid,
            )
        )
    return seen


def test_a_group_applied_set_based_ends_as_the_same_callbacks_one_by_one(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    one_by_one = messages_for_steps(db, migrated)
    applied_alone = []
    for step in STEPS:
        with db.transaction() as session:
            applied_alone.append(
                apply_status(
                    session,
                    one_by_one[step[0]],
                    report_of(step),
                    utcnow(),
                    dedupe_key=f"1{step[2]}",
                )
            )
    expected = outcome(db, one_by_one)

    together = messages_for_steps(db, migrated)
    with db.transaction() as session:
        targets = callback_targets(session, together)
        applied = apply_status_batch(
            session,
            [StatusMove(together[step[0]], report_of(step), f"2{step[2]}") for step in STEPS],
            targets,
            utcnow(),
        )
    assert (
        applied == applied_alone == [False, True, True, False, True, False, False, True, True, True]
    )
    got = outcome(db, together)
    for row in [*expected, *got]:
        row[8][:] = [(*event[:4], event[4][1:]) for event in row[8]]  # keys without the prefix
    assert got == expected


def messages_of_one_call(db: Database, settings: Settings) -> list[str]:
    """Two messages for one call (one jpToken), both claimed: their callbacks in one group
    write to the same call's row."""
    first = accept_message(db, settings, utcnow())
    with db.transaction() as session:
        token = session.execute(
            text(
                "SELECT t.token FROM interaction_tokens t JOIN messages m ON m.token_id = t.id"
                " WHERE m.sid = :sid"
            ),
            {"sid": first},
        ).scalar_one()
    second = accept_message(db, settings, utcnow(), jp_token=token)
    for sid in (first, second):
        with db.transaction() as session:
            assert claim(session, sid, settings, utcnow()) is not None
    return [first, second]


ONE_CALL_STEPS: list[Step] = [
    (0, MessageStatus.SENT, "a", "P0", None),
    (1, MessageStatus.DELIVERED, "b", "P1", None),  # overtook its `sent`: counted here
    (0, MessageStatus.DELIVERED, "c", "P0", None),
    (1, MessageStatus.SENT, "d", "P1", None),  # late: neither applied nor counted again
]


def test_a_group_moving_two_messages_of_one_call_counts_both_as_one_by_one(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    """One set-based UPDATE must not name a call twice (the second write would be lost), so
    a call with two messages in a group takes its writes in turns, in the order given."""
    one_by_one = messages_of_one_call(db, migrated)
    for step in ONE_CALL_STEPS:
        with db.transaction() as session:
            apply_status(
                session, one_by_one[step[0]], report_of(step), utcnow(), dedupe_key=f"1{step[2]}"
            )
    expected = outcome(db, one_by_one)
    together = messages_of_one_call(db, migrated)
    with db.transaction() as session:
        targets = callback_targets(session, together)
        moves = [
            StatusMove(together[step[0]], report_of(step), f"2{step[2]}") for step in ONE_CALL_STEPS
        ]
        assert apply_status_batch(session, moves, targets, utcnow()) == [True, True, True, False]
    got = outcome(db, together)
    for row in [*expected, *got]:
        row[8][:] = [(*event[:4], event[4][1:]) for event in row[8]]
    assert got == expected
    call = load_deflected_call(db, together[0])
    assert call.sms_count == 2
    assert call.last_message_sid == together[0]  # the last write applied: its delivery


def test_the_workers_sent_batch_counts_two_messages_of_one_call_twice(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sids = messages_of_one_call(db, migrated)
    reports = {
        sid: StatusReport(
            MessageStatus.SENT, source="provider", provider="simulator", provider_message_id=f"P{n}"
        )
        for n, sid in enumerate(sids)
    }
    with db.transaction() as session:
        assert sent_from_sending_batch(session, reports, utcnow()) == set(sids)
    call = load_deflected_call(db, sids[0])
    assert (call.sms_sent, call.sms_count) == (True, 2)
    assert call.last_message_sid in sids


def test_a_status_callback_group_over_http_answers_each_as_alone(
    client: TestClient[Litestar], db: Database, demo: Demo, migrated: Settings
) -> None:
    """Signed simulator callbacks that arrive together (one forged, one for no message of
    ours, one a repeat) through the API: each gets its own answer, and the set-based group
    leaves what they would leave one by one."""
    account_id, secret = simulator_credentials(db, TENANT)
    sids = [sent_message(db, migrated, f"SIM-{n}") for n in range(3)]
    before = count_events(db)

    def post(sid: str, status: str, *, forged: bool = False) -> Any:
        path = f"/callbacks/simulator?messageSid={sid}"
        body = json.dumps({"accountId": account_id, "id": f"SIM-{sid}", "status": status})
        stamp = str(int(time.time()))
        url = migrated.public_base_url.rstrip("/") + path
        signature = "0" * 64 if forged else sign(secret, stamp, url, body.encode())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: signature,
        }
        return client.post(path, content=body, headers=headers).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda args: post(*args[:2], forged=args[2]),
                [
                    (sids[0], "delivered", False),
                    (sids[1], "delivered", True),
                    (sids[2], "undelivered", False),
                    ("SM" + "e" * 32, "delivered", False),
                    (sids[0], "delivered", False),
                ],
            )
        )
    assert answers == [204, 403, 204, 204, 204]
    assert [load_message(db, sid).status for sid in sids] == ["delivered", "sent", "undelivered"]
    assert count_events(db) == before + 3  # delivered, undelivered, the unmatched one
    assert len(load_events(db, None)) == 1


@pytest.mark.parametrize("window_ms", [200, 0])
def test_callbacks_arriving_one_by_one_share_a_transaction_within_the_window(
    db: Database, demo: Demo, migrated: Settings, window_ms: int
) -> None:
    """A steady trickle (a capped bulk lane's receipts, a few milliseconds apart) makes one
    group within SMSD_CALLBACK_GROUP_WINDOW; without a window, a group closes at once."""
    sids = [sent_message(db, migrated, f"SIM-{n}") for n in range(3)]
    settings = migrated.model_copy(
        update={"callback_group_window": timedelta(milliseconds=window_ms)}
    )

    async def main() -> int:
        database = CountingDatabase(settings, db.config_cache)
        groups = CallbackGroups(database, settings)
        try:
            calls = []
            for sid in sids:
                work = callback(sid, MessageStatus.DELIVERED, f"key-{sid}")
                calls.append(asyncio.ensure_future(groups.apply(work, message_sid=sid)))
                await asyncio.sleep(0.004)  # a few ms apart, as a trickle arrives
            assert await asyncio.gather(*calls) == [True] * len(sids)
            await groups.close()
            return database.transactions
        finally:
            await database.dispose()

    transactions = asyncio.run(main())
    if window_ms:
        assert transactions == 1
    else:
        assert transactions > 1


def test_a_group_holding_its_messages_does_not_hold_up_inserts_that_refer_to_them(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    """The group locks its messages FOR NO KEY UPDATE: another transaction's delivery event
    for one of them (whose foreign key check takes KEY SHARE) goes in at once, not after the
    group commits."""
    sid = accept_message(db, migrated, utcnow())
    with db.transaction() as holding:
        assert sid in callback_targets(holding, [sid])
        with db.transaction() as other:
            other.execute(text("SET LOCAL lock_timeout = '500ms'"))
            other.execute(
                text(
                    "INSERT INTO delivery_events (message_sid, source, applied, created_at)"
                    " VALUES (:sid, 'test', true, now())"
                ),
                {"sid": sid},
            )
