"""POST /callbacks/simulator: signed delivery reports, applied through the one lifecycle."""

from __future__ import annotations

import json

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select

from shared.db import Database
from shared.lifecycle import StatusReport, apply_status
from shared.models import DeliveryEvent, MessageStatus, utcnow
from shared.providers.simulator import SIGNATURE_HEADER, sign
from shared.sending import claim, record_accepted
from shared.settings import Settings
from tests.conftest import Demo
from tests.shared.support import accept_message, count_events, load_events, load_message

PATH = "/callbacks/simulator"
UNKNOWN_SID = "SM" + "f" * 32


def signature(settings: Settings, path_and_query: str, body: bytes) -> str:
    url = settings.public_base_url.rstrip("/") + path_and_query
    return sign(settings.simulator_signing_secret.get_secret_value(), url, body)


def post_callback(
    client: TestClient[Litestar],
    settings: Settings,
    sid: str | None,
    payload: dict[str, object],
    *,
    signed_as: str | None = "",
) -> int:
    """Post like the simulator does; `signed_as` overrides the signature (None: no header)."""
    path = f"{PATH}?messageSid={sid}" if sid else PATH
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if signed_as == "":
        headers[SIGNATURE_HEADER] = signature(settings, path, body)
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
    client: TestClient[Litestar], settings: Settings, sid: str
) -> None:
    assert post_callback(client, settings, sid, {"id": "SIM-1", "status": "delivered"}) == 204


def test_signed_delivered_callback_moves_the_message_to_delivered(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    post_callback(client, settings, sid, {"id": "SIM-1", "status": "delivered"})
    message = load_message(db, sid)
    assert message.status == "delivered"
    assert message.delivered_at is not None


def test_callback_is_stored_as_a_delivery_event_with_its_payload(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    payload: dict[str, object] = {"id": "SIM-1", "status": "delivered"}
    post_callback(client, settings, sid, payload)
    last = load_events(db, sid)[-1]
    assert (last.source, last.provider, last.provider_status, last.applied, last.payload) == (
        "callback",
        "simulator",
        "delivered",
        True,
        payload,
    )


def test_undelivered_callback_keeps_the_error_code(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    post_callback(
        client, settings, sid, {"id": "SIM-1", "status": "undelivered", "errorCode": 30005}
    )
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("undelivered", "30005")


def test_forged_signature_is_403(
    client: TestClient[Litestar], settings: Settings, sid: str
) -> None:
    status = post_callback(client, settings, sid, {"status": "delivered"}, signed_as="0" * 64)
    assert status == 403


def test_forged_signature_changes_nothing(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, settings, sid, {"status": "delivered"}, signed_as="0" * 64)
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_missing_signature_is_403(
    client: TestClient[Litestar], settings: Settings, sid: str
) -> None:
    assert post_callback(client, settings, sid, {"status": "delivered"}, signed_as=None) == 403


def test_missing_signature_changes_nothing(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, settings, sid, {"status": "delivered"}, signed_as=None)
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_signature_of_another_message_is_403(
    client: TestClient[Litestar], db: Database, settings: Settings, demo: Demo, sid: str
) -> None:
    # The signature covers the query, so a signed body cannot be replayed for another sid.
    other = accept_message(db, settings, utcnow())
    body = json.dumps({"status": "failed"}).encode()
    stolen = signature(settings, f"{PATH}?messageSid={sid}", body)
    response = client.post(
        f"{PATH}?messageSid={other}",
        content=body,
        headers={SIGNATURE_HEADER: stolen, "Content-Type": "application/json"},
    )
    assert response.status_code == 403
    assert load_message(db, other).status == "queued"


def test_signature_with_another_secret_is_403(
    client: TestClient[Litestar], settings: Settings, sid: str
) -> None:
    path = f"{PATH}?messageSid={sid}"
    body = json.dumps({"status": "delivered"}).encode()
    wrong = sign("not-the-secret", settings.public_base_url + path, body)
    assert post_callback(client, settings, sid, {"status": "delivered"}, signed_as=wrong) == 403


def test_sent_after_delivered_leaves_the_message_delivered(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    post_callback(client, settings, sid, {"id": "SIM-1", "status": "delivered"})
    assert post_callback(client, settings, sid, {"id": "SIM-1", "status": "sent"}) == 204
    assert load_message(db, sid).status == "delivered"
    last = load_events(db, sid)[-1]
    assert (last.status, last.applied) == ("sent", False)


def test_delivered_before_the_worker_recorded_sent_is_applied(
    client: TestClient[Litestar], db: Database, settings: Settings, demo: Demo
) -> None:
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        assert claim(session, sid, settings, now) is not None
    assert post_callback(client, settings, sid, {"id": "SIM-9", "status": "delivered"}) == 204
    message = load_message(db, sid)
    assert message.status == "delivered"
    assert message.sent_at is not None


def test_callback_for_unknown_sid_is_204(
    client: TestClient[Litestar], settings: Settings, demo: Demo
) -> None:
    assert post_callback(client, settings, UNKNOWN_SID, {"status": "delivered"}) == 204


def test_callback_for_unknown_sid_is_stored_unmatched(
    client: TestClient[Litestar], db: Database, settings: Settings, demo: Demo
) -> None:
    post_callback(client, settings, UNKNOWN_SID, {"id": "SIM-404", "status": "delivered"})
    (event,) = load_events(db, None)
    assert (event.message_sid, event.status, event.provider_message_id, event.applied) == (
        None,
        "delivered",
        "SIM-404",
        False,
    )


def test_callback_without_message_sid_is_matched_by_provider_id(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    assert post_callback(client, settings, None, {"id": "SIM-1", "status": "delivered"}) == 204
    assert load_message(db, sid).status == "delivered"


def test_unknown_status_value_is_400(
    client: TestClient[Litestar], settings: Settings, sid: str
) -> None:
    assert post_callback(client, settings, sid, {"id": "SIM-1", "status": "exploded"}) == 400


def test_unknown_status_value_changes_nothing(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    events_before = count_events(db)
    post_callback(client, settings, sid, {"id": "SIM-1", "status": "exploded"})
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events_before


def test_missing_status_is_400(client: TestClient[Litestar], settings: Settings, sid: str) -> None:
    assert post_callback(client, settings, sid, {"id": "SIM-1"}) == 400


def test_body_that_is_not_a_json_object_is_400(
    client: TestClient[Litestar], db: Database, settings: Settings, sid: str
) -> None:
    path = f"{PATH}?messageSid={sid}"
    body = b"status=delivered"
    response = client.post(
        path, content=body, headers={SIGNATURE_HEADER: signature(settings, path, body)}
    )
    assert response.status_code == 400
    assert load_message(db, sid).status == "sent"


def test_callback_does_not_reopen_a_failed_message(
    client: TestClient[Litestar], db: Database, settings: Settings, demo: Demo
) -> None:
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        apply_status(session, sid, StatusReport(MessageStatus.FAILED, source="worker"), now)
    assert post_callback(client, settings, sid, {"status": "delivered"}) == 204
    assert load_message(db, sid).status == "failed"
    with db.transaction() as session:
        applied = session.scalars(
            select(DeliveryEvent.applied).where(DeliveryEvent.source == "callback")
        ).all()
    assert applied == [False]
