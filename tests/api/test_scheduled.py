"""Scheduled sends (`sendAt`, issue 14): a single send or a bulk batch held until its time,
validity counted from then, at most SMSD_SCHEDULE_HORIZON ahead; through the API in process,
on the real PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import redis
from celery import Celery
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select

from shared.core.broker import bulk_queue, create_celery
from shared.core.db import Database
from shared.core.models import Campaign, Message, ShortLink, utcnow
from shared.core.settings import Settings
from shared.messages.accept import SendSmsCommand
from shared.messages.lanes import BulkPump
from shared.messages.outbox import due_for_publish
from tests.support.api import (
    V3,
    issue_token,
    queued_sends,
    send_sms,
    stored_messages,
)
from tests.support.data import CALLER, Demo, headers

BULK = f"{V3}/campaign/sms/campaign1/bulk"
NUMBERS = ["+972544696388", "+972544696389", "+972544696390"]


def _at(moment: datetime) -> str:
    """`moment` as a caller writes it: RFC 3339 with an offset of its own (UTC+02:00)."""
    return moment.astimezone(timezone(timedelta(hours=2))).isoformat()


def test_a_send_with_a_later_send_at_is_stored_for_then_and_not_published(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings, redis_url: str
) -> None:
    when = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": _at(when)})

    assert response.status_code == 200, response.text
    assert response.text.startswith("Placed campaign {campaign1} in SMS queue messageSid: SM")
    [message] = stored_messages(db)
    assert message.next_attempt_at == when
    assert message.expires_at == when + migrated.message_validity  # validity counts from then
    assert message.status == "queued"
    assert queued_sends(redis_url) == []
    # The sweeper leaves it until its time, then publishes it.
    with db.transaction() as session:
        assert due_for_publish(session, migrated, when - timedelta(seconds=1)) == []
        assert due_for_publish(session, migrated, when) == [(message.sid, None)]


def test_a_send_at_that_has_come_sends_at_once(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings, redis_url: str
) -> None:
    token = issue_token(client)
    past = utcnow() - timedelta(minutes=5)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": _at(past)})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.next_attempt_at is None
    assert queued_sends(redis_url) == [("sms.send", [message.sid])]


@pytest.mark.parametrize(
    "send_at",
    [
        "tomorrow",
        "2026-12-24",  # a date alone
        "2026-12-24T09:00:00",  # no offset: whose nine o'clock?
        "2026-13-01T09:00:00Z",
        12345,
        "",  # blank, as if absent: accepted below
    ],
)
def test_an_unreadable_send_at_is_the_seeds_400_for_the_parameter(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str, send_at: object
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": send_at})

    if send_at == "":
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400
    assert response.text == "missing or invalid parameter sendAt"
    assert stored_messages(db) == []


def test_a_send_at_past_the_horizon_is_refused(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    token = issue_token(client)
    too_late = utcnow() + migrated.schedule_horizon + timedelta(minutes=1)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": _at(too_late)})

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter sendAt"
    assert stored_messages(db) == []


def test_an_idempotency_key_reused_with_another_send_at_is_a_different_request(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    later = utcnow() + timedelta(hours=1)
    body = {"callerId": CALLER, "jpToken": token, "sendAt": _at(later)}
    keyed = headers(**{"Idempotency-Key": "k-send-at"})
    first = send_sms(client, body, request_headers=keyed)
    again = send_sms(client, body, request_headers=keyed)
    moved = send_sms(
        client,
        {**body, "sendAt": _at(later + timedelta(minutes=1))},
        request_headers=keyed,
    )

    assert first.status_code == again.status_code == 200
    assert again.text == first.text
    assert moved.status_code == 422, moved.text
    assert len(stored_messages(db)) == 1


# Bulk


@pytest.fixture
def celery(migrated: Settings) -> Celery:
    return create_celery(migrated)


def _bulk(client: TestClient[Litestar], send_at: str) -> str:
    response = client.post(
        f"{BULK}?sendAt={quote(send_at)}",
        headers=headers(),
        json=[{"callerId": n} for n in NUMBERS],
    )
    assert response.status_code == 202, response.text
    batch_id: str = response.json()["batchId"]
    return batch_id


def _batch(db: Database, batch_id: str) -> list[Message]:
    with db.transaction() as session:
        return list(session.scalars(select(Message).where(Message.batch_id == batch_id)))


def test_a_bulk_batch_with_a_send_at_waits_for_it_in_the_bulk_lane(
    client: TestClient[Litestar],
    demo: Demo,
    db: Database,
    migrated: Settings,
    redis_url: str,
    celery: Celery,
) -> None:
    when = (utcnow() + timedelta(hours=2)).replace(microsecond=0)

    batch_id = _bulk(client, _at(when))

    messages = _batch(db, batch_id)
    assert {m.next_attempt_at for m in messages} == {when}
    assert {m.expires_at for m in messages} == {when + migrated.message_validity}
    # The API's pump published nothing: not due. At its time, the pump takes it.
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(bulk_queue(migrated)) == 0
    pump = BulkPump(celery, db, migrated)
    assert pump.pump(when - timedelta(seconds=1)) == 0
    assert pump.pump(when) == len(NUMBERS)


def test_cancelling_a_scheduled_batch_cancels_its_messages(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    batch_id = _bulk(client, _at(utcnow() + timedelta(days=1)))

    cancelled = client.delete(f"{BULK}/{batch_id}", headers=headers())

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled"] == len(NUMBERS)
    assert {m.status for m in _batch(db, batch_id)} == {"cancelled"}


@pytest.mark.parametrize("send_at", ["soon", "2026-12-24T09:00:00", "far"])
def test_a_bulk_send_at_unreadable_or_past_the_horizon_is_a_400_and_stores_nothing(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings, send_at: str
) -> None:
    if send_at == "far":
        send_at = _at(utcnow() + migrated.schedule_horizon + timedelta(hours=1))

    response = client.post(
        f"{BULK}?sendAt={quote(send_at)}",
        headers=headers(),
        json=[{"callerId": n} for n in NUMBERS],
    )

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter sendAt"
    assert stored_messages(db) == []


def test_a_scheduled_send_is_still_found_by_its_lookup_as_queued(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    later = datetime.now(UTC) + timedelta(hours=1)
    sent = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token, "sendAt": _at(later)},
        request_headers=headers(Accept="application/json"),
    )
    sid = sent.json()["messageSid"]

    found = client.get(f"{V3}/messages/{sid}", headers=headers())

    assert found.status_code == 200, found.text
    assert found.json()["status"] == "queued"


def test_a_scheduled_sends_short_link_lives_from_when_it_is_sent(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    with db.transaction() as session:
        campaign = session.scalars(select(Campaign).where(Campaign.campaign_id == "campaign1"))
        campaign.one().shorten_links = True
    when = (utcnow() + timedelta(days=20)).replace(microsecond=0)
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": _at(when)})

    assert response.status_code == 200, response.text
    with db.transaction() as session:
        link = session.scalars(select(ShortLink)).one()
    assert link.expires_at == when + migrated.short_link_lifetime


def test_a_request_without_send_at_keeps_the_fingerprint_it_had_before_send_at_existed() -> None:
    # An Idempotency-Key retried across the upgrade must still match its first answer: the
    # fingerprint of a request without sendAt is the hash of the same fields as before.
    command = SendSmsCommand(
        account_in_url="1",
        tenant_id="1",
        application_key="k",
        environment_name=None,
        campaign_id="c",
        caller_id="+972544696388",
        jp_token="t",
        idempotency_key="key",
    )
    before = {
        "account_in_url": "1",
        "environment_name": None,
        "campaign_id": "c",
        "caller_id": "+972544696388",
        "sender": None,
        "jp_token": "t",
        "additional_params": None,
        "invalid_parameter": None,
        "require_token": True,
        "from_system_account": False,
    }
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert command.fingerprint() == expected
    later = SendSmsCommand(**{**asdict(command), "send_at": utcnow()})
    assert later.fingerprint() != expected


def test_a_bulk_send_at_whose_offset_plus_was_not_encoded_is_read_as_meant(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    when = (utcnow() + timedelta(hours=2)).replace(microsecond=0)
    written = when.astimezone(timezone(timedelta(hours=2))).isoformat()  # ...+02:00

    # The "+" as it stands in the URL: a query decodes it to a space.
    response = client.post(
        f"{BULK}?sendAt={written}", headers=headers(), json=[{"callerId": NUMBERS[0]}]
    )

    assert response.status_code == 202, response.text
    assert {m.next_attempt_at for m in _batch(db, response.json()["batchId"])} == {when}
