"""Vonage as real accounts are set up, end to end: real worker and API processes, the Vonage
SDK, and the simulator playing Vonage (multi-part texts, one receipt per part, the dashboard's
default "MD5 hash" signing, and the unsigned receipts most accounts get)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import delete, select

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.models import Message, MessagePart, ProviderAccount, utcnow
from shared.core.settings import Settings
from tests.support.data import SENDER, TENANT, Demo
from tests.support.messages import accept_message
from tests.support.processes import Process, wait_until
from tests.support.providers import VONAGE_KEY, VONAGE_SECRET, register_vonage

# Two GSM-7 parts once the link is in: Vonage answers two ids and sends two receipts.
LONG_TEXT = "Thank you for calling. " * 8 + "Continue here: <link>"


def _use_vonage(db: Database, settings: Settings, **extra: Any) -> dict[str, Any]:
    credentials = {
        "api_key": VONAGE_KEY,
        "api_secret": VONAGE_SECRET,
        "rest_host": f"127.0.0.1:{settings.simulator_tls_port}",
        **extra,
    }
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account.id))
        provisioning.set_provider(
            session, account, "vonage", sender_ids=[SENDER], credentials=credentials
        )
        environment = access.resolve_environment(session, account, None)
        provisioning.upsert_campaign(
            session,
            environment,
            "campaign1",
            name="Deflection",
            message_text=LONG_TEXT,
            link_url="https://flows.example.com/start?lang=en",
        )
    register_vonage(settings, credentials)
    return credentials


def _delivered(db: Database, count: int) -> bool:
    with db.transaction() as session:
        statuses = Counter(session.scalars(select(Message.status)))
    return statuses["delivered"] == count


def _parts(db: Database) -> dict[str, int]:
    with db.transaction() as session:
        rows = session.execute(
            select(MessagePart.message_sid, MessagePart.status).where(
                MessagePart.status == "delivered"
            )
        ).all()
    return Counter(row.message_sid for row in rows)


def test_md5_hash_signed_account_delivers_every_part_of_long_texts_once(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    _use_vonage(db, migrated, signature_secret="md5-hash-secret", signature_method="md5hash")
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(5)]
    start_worker()
    wait_until(lambda: _delivered(db, len(sids)), 60, "every long text delivered")
    # Every part of every message stored and delivered; the simulator took each text once.
    assert _parts(db) == dict.fromkeys(sids, 2)
    handset = simulator.get("/messages", params={"provider": "vonage"}).json()
    assert Counter(m["clientRef"] for m in handset) == Counter(dict.fromkeys(sids, 1))


def test_unsigned_receipts_are_taken_through_the_accounts_callback_token(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    # No signature secret: requests unsigned, receipts unsigned, as in most real accounts.
    _use_vonage(db, migrated)
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(3)]
    start_worker()
    wait_until(lambda: _delivered(db, len(sids)), 60, "every text delivered")
    assert _parts(db) == dict.fromkeys(sids, 2)
