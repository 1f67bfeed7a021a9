"""The accept path's lookup cache: it saves the account, key, environment, campaign and provider
reads, and a change to any of them, by any process, is seen by the very next request."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import text, update

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.errors import ProviderNotDefined, TokenExpired, Unauthenticated
from shared.core.models import ApplicationKey, Campaign, ProviderAccount
from shared.core.settings import Settings
from tests.support.data import KEY, TENANT, Demo
from tests.support.messages import accept_message, load_message
from tests.support.sql import statements

CACHED_TABLES = ("accounts", "application_keys", "environments", "campaigns", "provider_accounts")


def reads_of_cached_tables(sql: list[str]) -> list[str]:
    return [s for s in sql if s.lstrip().upper().startswith("SELECT") and _names_cached(s)]


def _names_cached(statement: str) -> bool:
    return any(f"FROM {t}" in statement or f"JOIN {t}" in statement for t in CACHED_TABLES)


def test_a_second_accept_reads_none_of_the_cached_tables(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    with statements(db) as sql:
        sid = accept_message(db, settings, t0, with_token=False)

    assert reads_of_cached_tables(sql) == []
    assert sum("FROM config_generation" in s for s in sql) == 1
    assert load_message(db, sid).body.startswith("Please click here ")


def test_a_revoked_key_is_refused_by_the_next_request_of_another_process(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    # Another process (the CLI) with its own engine and cache revokes the key.
    other = Database(settings)
    try:
        with other.transaction() as session:
            session.execute(update(ApplicationKey).values(revoked_at=t0))
    finally:
        other.dispose()

    with pytest.raises(Unauthenticated):
        accept_message(db, settings, t0, with_token=False)


def test_a_paused_campaign_and_new_text_take_effect_at_once(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        session.execute(update(Campaign).values(message_text="New text <link>"))
    sid = accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        session.execute(update(Campaign).values(active=False))

    assert load_message(db, sid).body.startswith("New text ")
    with pytest.raises(TokenExpired):
        accept_message(db, settings, t0, with_token=False)


def test_changed_provider_settings_are_used_by_the_next_request(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(sender_ids=["+12025550177"]))
    sid = accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(expires_at=t0))

    assert load_message(db, sid).from_number == "+12025550177"
    with pytest.raises(ProviderNotDefined):
        accept_message(db, settings, t0, with_token=False)


def test_truncated_and_recreated_rows_with_the_same_ids_are_read_again(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        session.execute(
            text(
                "TRUNCATE messages, config_generation, "
                + ", ".join(CACHED_TABLES)
                + " RESTART IDENTITY CASCADE"
            )
        )
    with db.transaction() as session:
        account = provisioning.create_account(session, TENANT, "Demo again", "PROD")
        provisioning.add_application_key(session, account, KEY)
        prod = access.resolve_environment(session, account, None)
        provisioning.upsert_campaign(
            session, prod, "campaign1", name="x", message_text="Recreated <link>", link_url=None
        )
        provisioning.set_provider(session, account, "simulator", sender_ids=["+12025550199"])

    sid = accept_message(db, settings, t0, with_token=False)

    message = load_message(db, sid)
    assert (message.body, message.from_number) == ("Recreated ", "+12025550199")


def test_wrong_keys_are_never_cached(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    accept_message(db, settings, t0, with_token=False)
    with db.transaction() as session:
        for n in range(20):
            with pytest.raises(Unauthenticated):
                access.authenticate(session, TENANT, TENANT, f"wrong-{n}")
        with statements(db) as sql, pytest.raises(Unauthenticated):
            access.authenticate(session, TENANT, TENANT, "wrong-0")

    assert len(reads_of_cached_tables(sql)) == 1  # read again, not answered from memory
