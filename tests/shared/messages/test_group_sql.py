"""The PostgreSQL fast path of a group accept (shared/messages/group_sql.py) against a real
PostgreSQL: what it writes, and every case it must hand back to the session path before it
writes anything."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import TypeVar

import pytest
from sqlalchemy import select, update

from shared.accounts import access, provisioning
from shared.calls.tokens import issue_token
from shared.core.config_cache import NotCached
from shared.core.db import Abandoned, AsyncDatabase, AsyncTransaction, Database
from shared.core.errors import CampaignNotFound, InvalidParameter, TokenExpired
from shared.core.models import Campaign, Message, utcnow
from shared.core.settings import Settings
from shared.messages.accept import (
    AcceptedMessage,
    Outcome,
    SendSmsCommand,
    accept_group,
)
from shared.messages.group_sql import KeyRaceLost, accept_group_on_postgres
from shared.messages.queries import ACCEPTED_COLUMNS
from tests.support.data import CALLER, KEY, TENANT, Demo

T = TypeVar("T")

# What differs between two messages of one request's kind: everything else must be equal.
PER_MESSAGE = {
    "sid",
    "idempotency_key",
    "request_fingerprint",
    "created_at",
    "updated_at",
    "expires_at",
}


@pytest.fixture
def async_db(db: Database, migrated: Settings) -> Iterator[AsyncDatabase]:
    database = AsyncDatabase(migrated, db.config_cache)
    yield database
    asyncio.run(database.dispose())


def token_for(db: Database, settings: Settings) -> str:
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        environment = access.resolve_environment(session, account, None)
        return issue_token(
            session, account, environment, CALLER, settings.token_lifetime, utcnow()
        ).token


def command(
    token: str | None, *, key: str | None = None, campaign: str = "campaign1"
) -> SendSmsCommand:
    return SendSmsCommand(
        account_in_url=TENANT,
        tenant_id=TENANT,
        application_key=KEY,
        environment_name=None,
        campaign_id=campaign,
        caller_id=CALLER,
        jp_token=token,
        idempotency_key=key,
    )


def warm(db: Database, settings: Settings, token: str) -> None:
    """Fill the config cache the way a first request does: through the session path."""
    with db.transaction() as session:
        accept_group(session, [command(token)], settings, utcnow())


def in_transaction(async_db: AsyncDatabase, work: Callable[[AsyncTransaction], Awaitable[T]]) -> T:
    async def run() -> T:
        async with async_db.transaction() as transaction:
            return await work(transaction)

    return asyncio.run(run())


def fast(
    async_db: AsyncDatabase,
    commands: list[SendSmsCommand],
    settings: Settings,
    *,
    wanted: list[bool] | None = None,
    now: datetime | None = None,
) -> list[Outcome]:
    return in_transaction(
        async_db,
        lambda transaction: accept_group_on_postgres(
            transaction,
            async_db.config_cache,
            commands,
            settings,
            now or utcnow(),
            [],
            lambda: wanted if wanted is not None else [True] * len(commands),
        ),
    )


def messages(db: Database) -> list[Message]:
    with db.transaction() as session:
        return list(session.scalars(select(Message).order_by(Message.created_at)))


def test_a_group_is_written_as_the_session_path_writes_it(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    token = token_for(db, migrated)
    warm(db, migrated, token)
    [reference] = messages(db)

    outcomes = fast(async_db, [command(token), command(token, key="k-1")], migrated)

    assert all(isinstance(outcome, AcceptedMessage) for outcome in outcomes)
    rows = {row.sid: row for row in messages(db)}
    for outcome in outcomes:
        assert isinstance(outcome, AcceptedMessage)
        row = rows[outcome.sid]
        for column in set(ACCEPTED_COLUMNS) - PER_MESSAGE:
            assert getattr(row, column) == getattr(reference, column), column
        assert row.expires_at - row.created_at == migrated.message_validity
    assert rows[outcomes[1].sid].idempotency_key == "k-1"  # type: ignore[union-attr]
    assert rows[outcomes[1].sid].request_fingerprint  # type: ignore[union-attr]


def test_refusals_answer_each_request_alone_and_the_rest_are_written(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    token = token_for(db, migrated)
    warm(db, migrated, token)
    before = len(messages(db))
    no_caller = dataclasses.replace(command(token), caller_id="not a number")

    good, unknown_token, bad_caller = fast(
        async_db, [command(token), command("Zzzzzz9"), no_caller], migrated
    )

    assert isinstance(good, AcceptedMessage)
    assert isinstance(unknown_token, InvalidParameter)
    assert unknown_token.parameter == "jpToken"
    assert isinstance(bad_caller, InvalidParameter)
    assert bad_caller.parameter == "callerId"
    assert len(messages(db)) == before + 1


def test_an_unknown_campaign_is_handed_to_the_session_path(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    """A campaign that does not exist is never cached (guessing must not fill the cache), so
    only the session path can answer its 404."""
    token = token_for(db, migrated)
    warm(db, migrated, token)

    with pytest.raises(NotCached):
        fast(async_db, [command(token), command(token, campaign="nope")], migrated)

    with db.transaction() as session:
        [outcome] = accept_group(session, [command(token, campaign="nope")], migrated, utcnow())
    assert isinstance(outcome, CampaignNotFound)


def test_an_empty_cache_is_handed_to_the_session_path_before_anything_is_read(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    token = token_for(db, migrated)
    db.config_cache.clear()

    with pytest.raises(NotCached):
        fast(async_db, [command(token)], migrated)
    assert messages(db) == []


def test_a_config_change_since_the_cache_was_read_is_handed_to_the_session_path(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    """The cache still says campaign1 is active; the database (a trigger moved the config
    generation) says it is paused: the fast path must not trust the cache."""
    token = token_for(db, migrated)
    warm(db, migrated, token)
    before = len(messages(db))
    with db.transaction() as session:
        session.execute(update(Campaign).values(active=False))

    with pytest.raises(NotCached):
        fast(async_db, [command(token)], migrated)
    assert len(messages(db)) == before

    with db.transaction() as session:  # the session path then answers with the truth
        [outcome] = accept_group(session, [command(token)], migrated, utcnow())
    assert isinstance(outcome, TokenExpired)


def test_a_key_taken_by_a_concurrent_twin_rolls_the_group_back(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    """The twin commits between the fast path's read (no message holds the key) and its
    write: the keyed insert takes nothing, KeyRaceLost, and nothing of the group stays."""
    token = token_for(db, migrated)
    warm(db, migrated, token)
    before = len(messages(db))

    async def race(transaction: AsyncTransaction) -> list[Outcome]:
        def still_wanted() -> list[bool]:
            # Called after the reads, before the writes leave: the twin lands now.
            with db.transaction() as session:
                accept_group(session, [command(token, key="twin")], migrated, utcnow())
            return [True, True]

        return await accept_group_on_postgres(
            transaction,
            async_db.config_cache,
            [command(token), command(token, key="twin")],
            migrated,
            utcnow(),
            [],
            still_wanted,
        )

    with pytest.raises(KeyRaceLost):
        in_transaction(async_db, race)
    assert len(messages(db)) == before + 1  # only the twin's


def test_a_request_that_stopped_waiting_has_no_message_written(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    token = token_for(db, migrated)
    warm(db, migrated, token)
    before = len(messages(db))

    kept, gone = fast(async_db, [command(token), command(token)], migrated, wanted=[True, False])

    assert isinstance(kept, AcceptedMessage)
    assert isinstance(gone, Abandoned)
    sids = {row.sid for row in messages(db)}
    assert kept.sid in sids
    assert len(sids) == before + 1


def test_a_campaign_with_short_links_is_handed_to_the_session_path(
    db: Database, async_db: AsyncDatabase, migrated: Settings, demo: Demo
) -> None:
    token = token_for(db, migrated)
    with db.transaction() as session:
        session.execute(
            update(Campaign).values(link_url="https://example.com/start", shorten_links=True)
        )
    warm(db, migrated, token)
    before = len(messages(db))

    with pytest.raises(NotCached):
        fast(async_db, [command(token)], migrated)
    assert len(messages(db)) == before
