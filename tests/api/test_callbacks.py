"""POST /callbacks/simulator: signed delivery reports, applied through the one lifecycle."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import DeliveryEvent, MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages.claims import claim, record_accepted
from shared.messages.lifecycle import StatusReport, apply_status
from shared.providers.simulator import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.api import simulator_credentials
from tests.support.data import TENANT, Demo
from tests.support.messages import accept_message, count_events, load_events, load_message

PATH = "/callbacks/simulator"
UNKNOWN_SID = "SM" + "f" * 32


@dataclass(frozen=True)
class Signer:
    """The demo account's simulator account, signing as the simulator does."""

    settings: Settings
    account_id: str
    secret: str


@pytest.fixture
def signer(db: Database, demo: Demo, settings: Settings) -> Signer:
    account_id, secret = simulator_credentials(db, TENANT)
    return Signer(settings, account_id, secret)


def signature(signer: Signer, path_and_query: str, body: bytes, timestamp: str) -> str:
    url = signer.settings.public_base_url.rstrip("/") + path_and_query
    return sign(signer.secret, timestamp, url, body)


def post_callback(
    client: TestClient[Litestar],
    signer: Signer,
    sid: str | None,
    payload: dict[str, object],
    *,
    signed_as: str | None = "",
    timestamp: str | None = None,
) -> int:
    """Post like the simulator does; `signed_as` overrides the signature (None: no header)."""
    path = f"{PATH}?messageSid={sid}" if sid else PATH
    body = json.dumps({"accountId": signer.account_id, **payload}).encode()
    stamp = timestamp or str(int(time.time()))
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp}
    if signed_as == "":
        headers[SIGNATURE_HEADER] = signature(signer, path, body, stamp)
    elif signed_as is not None:
        headers[SIGNATURE_HEADER] = signed_as
    status: int = client.post(path, content=body, headers=headers).status_code
    return status


@pytest.fixture
def sid(db: Database, demo: Demo, settings: Settings) -> str:
    """A message the worker handed to the simulator, which answered with id SIM-1."""
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        owned = claim(session, sid, settings, now)
        assert owned is not None
        record_accepted(session, owned, "SIM-1", "queued", now)
    return sid


def test_signed_delivered_callback_answers_204(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    assert post_callback(client, signer, sid, {"id": "SIM-1", "status": "delivered"}) == 204


def test_signed_delivered_callback_moves_the_message_to_delivered(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    post_callback(client, signer, sid, {"id": "SIM-1", "status": "delivered"})
    message = load_message(db, sid)
    assert message.status == "delivered"
    assert message.delivered_at is not None


def test_callback_is_stored_as_a_delivery_event_with_its_payload(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    payload: dict[str, object] = {
        "id": "SIM-1",
        "status": "delivered",
        "accountId": signer.account_id,
    }
    post_callback(client, signer, sid, payload)
    last = load_events(db, sid)[-1]
    assert (last.source, last.provider, last.provider_status, last.applied, last.payload) == (
        "callback",
        "simulator",
        "delivered",
        True,
        payload,
    )


def test_undelivered_callback_keeps_the_error_code(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    post_callback(client, signer, sid, {"id": "SIM-1", "status": "undelivered", "errorCode": 30005})
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("undelivered", "30005")


def test_forged_signature_is_403(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    status = post_callback(client, signer, sid, {"status": "delivered"}, signed_as="0" * 64)
    assert status == 403


def test_forged_signature_changes_nothing(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, signer, sid, {"status": "delivered"}, signed_as="0" * 64)
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_missing_signature_is_403(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    assert post_callback(client, signer, sid, {"status": "delivered"}, signed_as=None) == 403


def test_missing_signature_changes_nothing(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, signer, sid, {"status": "delivered"}, signed_as=None)
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_signature_of_another_message_is_403(
    client: TestClient[Litestar],
    db: Database,
    signer: Signer,
    settings: Settings,
    demo: Demo,
    sid: str,
) -> None:
    # The signature covers the query, so a signed body cannot be replayed for another sid.
    other = accept_message(db, settings, utcnow())
    body = json.dumps({"accountId": signer.account_id, "status": "failed"}).encode()
    stamp = str(int(time.time()))
    stolen = signature(signer, f"{PATH}?messageSid={sid}", body, stamp)
    response = client.post(
        f"{PATH}?messageSid={other}",
        content=body,
        headers={
            SIGNATURE_HEADER: stolen,
            TIMESTAMP_HEADER: stamp,
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 403
    assert load_message(db, other).status == "queued"


def test_signature_with_another_secret_is_403(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    path = f"{PATH}?messageSid={sid}"
    body = json.dumps({"accountId": signer.account_id, "status": "delivered"}).encode()
    stamp = str(int(time.time()))
    wrong = sign("not-the-secret", stamp, settings.public_base_url + path, body)
    status = post_callback(
        client, signer, sid, {"status": "delivered"}, signed_as=wrong, timestamp=stamp
    )
    assert status == 403


def test_sent_after_delivered_leaves_the_message_delivered(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    post_callback(client, signer, sid, {"id": "SIM-1", "status": "delivered"})
    assert post_callback(client, signer, sid, {"id": "SIM-1", "status": "sent"}) == 204
    assert load_message(db, sid).status == "delivered"
    last = load_events(db, sid)[-1]
    assert (last.status, last.applied) == ("sent", False)


def test_delivered_before_the_worker_recorded_sent_is_applied(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, demo: Demo
) -> None:
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        assert claim(session, sid, settings, now) is not None
    assert post_callback(client, signer, sid, {"id": "SIM-9", "status": "delivered"}) == 204
    message = load_message(db, sid)
    assert message.status == "delivered"
    assert message.sent_at is not None


def test_callback_for_unknown_sid_is_204(
    client: TestClient[Litestar], signer: Signer, settings: Settings, demo: Demo
) -> None:
    assert post_callback(client, signer, UNKNOWN_SID, {"status": "delivered"}) == 204


def test_callback_for_unknown_sid_is_stored_unmatched(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, demo: Demo
) -> None:
    post_callback(client, signer, UNKNOWN_SID, {"id": "SIM-404", "status": "delivered"})
    (event,) = load_events(db, None)
    assert (event.message_sid, event.status, event.provider_message_id, event.applied) == (
        None,
        "delivered",
        "SIM-404",
        False,
    )


def test_callback_without_message_sid_is_matched_by_provider_id(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    assert post_callback(client, signer, None, {"id": "SIM-1", "status": "delivered"}) == 204
    assert load_message(db, sid).status == "delivered"


def test_unknown_status_value_is_400(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    assert post_callback(client, signer, sid, {"id": "SIM-1", "status": "exploded"}) == 400


def test_unknown_status_value_changes_nothing(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, signer, sid, {"id": "SIM-1", "status": "exploded"})
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_missing_status_is_400(
    client: TestClient[Litestar], signer: Signer, settings: Settings, sid: str
) -> None:
    assert post_callback(client, signer, sid, {"id": "SIM-1"}) == 400


def test_body_that_is_not_a_json_object_is_400(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, sid: str
) -> None:
    path = f"{PATH}?messageSid={sid}"
    body = b"status=delivered"
    stamp = str(int(time.time()))
    response = client.post(
        path,
        content=body,
        headers={SIGNATURE_HEADER: signature(signer, path, body, stamp), TIMESTAMP_HEADER: stamp},
    )
    assert response.status_code == 400
    assert load_message(db, sid).status == "sent"


def test_callback_does_not_reopen_a_failed_message(
    client: TestClient[Litestar], db: Database, signer: Signer, settings: Settings, demo: Demo
) -> None:
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        apply_status(session, sid, StatusReport(MessageStatus.FAILED, source="worker"), now)
    assert post_callback(client, signer, sid, {"status": "delivered"}) == 204
    assert load_message(db, sid).status == "failed"
    with db.transaction() as session:
        applied = session.scalars(
            select(DeliveryEvent.applied).where(DeliveryEvent.source == "callback")
        ).all()
    assert applied == [False]
