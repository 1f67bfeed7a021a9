"""Provider webhooks change only messages of the provider account that signed them; replays
and repeats change nothing; multi-part receipts and Twilio's opt-out code are honoured.

Tenant A (the demo account) and tenant B (the other account) each hold settings of their own
for one provider. B signs every forgery with its own, valid secret."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import delete, select, update
from twilio.request_validator import RequestValidator
from vonage_http_client.auth import Auth

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.models import Message, MessagePart, OptOut, ProviderAccount, utcnow
from shared.core.settings import Settings
from shared.messages.claims import claim, record_accepted
from shared.providers.simulator import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.data import CALLER, OTHER_TENANT, SENDER, TENANT, Demo
from tests.support.messages import accept_message, count_events, load_events, load_message


@dataclass(frozen=True)
class Tenant:
    """One tenant's provider settings, as the provider account holder knows them."""

    tenant: str
    credentials: dict[str, Any]


def _provide(db: Database, tenant: str, provider: str, credentials: dict[str, Any]) -> Tenant:
    with db.transaction() as session:
        account = provisioning.get_account(session, tenant)
        session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account.id))
        row = provisioning.set_provider(
            session, account, provider, sender_ids=[SENDER], credentials=credentials
        )
        return Tenant(tenant, dict(row.credentials))


def _sent(db: Database, settings: Settings, provider_id: str, **parts: Any) -> str:
    """A message of tenant A that the provider took, answering `provider_id`."""
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        owned = claim(session, sid, settings, now)
        assert owned is not None
        record_accepted(session, owned, provider_id, "queued", now, **parts)
    return sid


def twilio_credentials() -> dict[str, Any]:
    return {"account_sid": "AC" + secrets.token_hex(16), "auth_token": secrets.token_hex(16)}


def vonage_credentials() -> dict[str, Any]:
    return {
        "api_key": secrets.token_hex(4),
        "api_secret": secrets.token_hex(8),
        "signature_secret": secrets.token_hex(16),
        "signature_method": "sha256",
    }


def twilio_post(
    client: TestClient[Litestar],
    settings: Settings,
    signer: Tenant,
    sid: str,
    provider_id: str,
    status: str,
    **extra: str,
) -> int:
    path = f"/callbacks/twilio?messageSid={sid}"
    token = extra.pop("idempotency", None)
    params = {
        "MessageSid": provider_id,
        "AccountSid": signer.credentials["account_sid"],
        "MessageStatus": status,
        "To": CALLER,
        "From": SENDER,
        **extra,
    }
    signature = RequestValidator(signer.credentials["auth_token"]).compute_signature(
        settings.public_base_url + path, params
    )
    headers = {"X-Twilio-Signature": signature}
    if token:
        headers["I-Twilio-Idempotency-Token"] = token
    response = client.post(path, data=params, headers=headers)
    return response.status_code


def vonage_params(
    signer: Tenant, sid: str, provider_id: str, status: str, *, timestamp: int | None = None
) -> dict[str, str]:
    """A delivery receipt as Vonage sends it, signed with the signer's secret."""
    params = {
        "msisdn": CALLER.removeprefix("+"),
        "to": SENDER.removeprefix("+"),
        "messageId": provider_id,
        "status": status,
        "err-code": "0",
        "api-key": signer.credentials["api_key"],
        "client-ref": sid,
        "message-timestamp": "2026-11-30 09:00:00",
        "timestamp": str(int(time.time()) if timestamp is None else timestamp),
    }
    params["sig"] = Auth(
        api_key=signer.credentials["api_key"],
        signature_secret=signer.credentials["signature_secret"],
        signature_method="sha256",
    ).sign_params(dict(params))
    return params


def unsigned_receipt(signer: Tenant, sid: str, provider_id: str, status: str) -> dict[str, str]:
    return {
        "messageId": provider_id,
        "status": status,
        "err-code": "0",
        "api-key": signer.credentials["api_key"],
        "client-ref": sid,
        "msisdn": CALLER.removeprefix("+"),
        "to": SENDER.removeprefix("+"),
    }


def simulator_post(
    client: TestClient[Litestar],
    settings: Settings,
    signer: Tenant,
    sid: str,
    provider_id: str,
    status: str,
    *,
    timestamp: int | None = None,
) -> int:
    path = f"/callbacks/simulator?messageSid={sid}"
    body = json.dumps(
        {"id": provider_id, "status": status, "accountId": signer.credentials["account_id"]}
    ).encode()
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = sign(
        signer.credentials["signing_secret"], stamp, settings.public_base_url + path, body
    )
    headers = {
        SIGNATURE_HEADER: signature,
        TIMESTAMP_HEADER: stamp,
        "Content-Type": "application/json",
    }
    return client.post(path, content=body, headers=headers).status_code


# --- a tenant's valid signature never reaches another tenant's message -----------------------


@pytest.fixture
def twilio_pair(db: Database, demo: Demo) -> tuple[Tenant, Tenant]:
    return (
        _provide(db, TENANT, "twilio", twilio_credentials()),
        _provide(db, OTHER_TENANT, "twilio", twilio_credentials()),
    )


@pytest.fixture
def vonage_pair(db: Database, demo: Demo) -> tuple[Tenant, Tenant]:
    return (
        _provide(db, TENANT, "vonage", vonage_credentials()),
        _provide(db, OTHER_TENANT, "vonage", vonage_credentials()),
    )


@pytest.fixture
def simulator_pair(db: Database, demo: Demo) -> tuple[Tenant, Tenant]:
    return (
        _provide(db, TENANT, "simulator", {}),
        _provide(db, OTHER_TENANT, "simulator", {}),
    )


def test_twilio_callback_signed_by_another_tenant_is_403_and_changes_nothing(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    _, attacker = twilio_pair
    sid = _sent(db, settings, "SM" + "a" * 32)
    events = count_events(db)
    status = twilio_post(client, settings, attacker, sid, "SM" + "a" * 32, "undelivered")
    assert status == 403
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events


def test_twilio_callback_naming_the_victims_account_but_signed_by_another_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    victim, attacker = twilio_pair
    sid = _sent(db, settings, "SM" + "b" * 32)
    impostor = Tenant(
        attacker.tenant,
        {**attacker.credentials, "account_sid": victim.credentials["account_sid"]},
    )
    assert twilio_post(client, settings, impostor, sid, "SM" + "b" * 32, "delivered") == 403
    assert load_message(db, sid).status == "sent"


def test_twilio_callback_signed_by_the_senders_account_is_applied(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = twilio_pair
    sid = _sent(db, settings, "SM" + "c" * 32)
    assert twilio_post(client, settings, victim, sid, "SM" + "c" * 32, "delivered") == 204
    assert load_message(db, sid).status == "delivered"


def test_twilio_callback_found_by_provider_id_alone_is_still_bound(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    _, attacker = twilio_pair
    sid = _sent(db, settings, "SM" + "d" * 32)
    params = {
        "MessageSid": "SM" + "d" * 32,
        "AccountSid": attacker.credentials["account_sid"],
        "MessageStatus": "delivered",
    }
    url = settings.public_base_url + "/callbacks/twilio"
    signature = RequestValidator(attacker.credentials["auth_token"]).compute_signature(url, params)
    response = client.post(
        "/callbacks/twilio", data=params, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 403
    assert load_message(db, sid).status == "sent"


def test_vonage_receipt_signed_by_another_tenant_is_403_and_changes_nothing(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    _, attacker = vonage_pair
    sid = _sent(db, settings, "0A00000000000001")
    events = count_events(db)
    params = vonage_params(attacker, sid, "0A00000000000001", "delivered")
    assert client.post(f"/callbacks/vonage?messageSid={sid}", data=params).status_code == 403
    assert load_message(db, sid).status == "sent"
    assert count_events(db) == events


def test_vonage_receipt_to_another_tenants_callback_token_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    _, attacker = vonage_pair
    sid = _sent(db, settings, "0A00000000000002")
    params = unsigned_receipt(attacker, sid, "0A00000000000002", "delivered")
    token = attacker.credentials[access.CALLBACK_TOKEN]
    assert client.get(f"/callbacks/vonage/{token}", params=params).status_code == 403
    assert load_message(db, sid).status == "sent"


def test_vonage_unsigned_receipt_with_the_senders_token_is_applied(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "0A00000000000003")
    params = unsigned_receipt(victim, sid, "0A00000000000003", "delivered")
    token = victim.credentials[access.CALLBACK_TOKEN]
    assert client.get(f"/callbacks/vonage/{token}", params=params).status_code == 204
    assert load_message(db, sid).status == "delivered"


def test_vonage_unsigned_receipt_without_a_token_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "0A00000000000004")
    params = unsigned_receipt(victim, sid, "0A00000000000004", "delivered")
    assert client.get("/callbacks/vonage", params=params).status_code == 403
    assert load_message(db, sid).status == "sent"


def test_simulator_callback_signed_by_another_tenants_account_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    simulator_pair: tuple[Tenant, Tenant],
) -> None:
    _, attacker = simulator_pair
    sid = _sent(db, settings, "SIM-A")
    assert simulator_post(client, settings, attacker, sid, "SIM-A", "undelivered") == 403
    assert load_message(db, sid).status == "sent"


def test_simulator_callback_naming_the_victims_account_with_another_secret_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    simulator_pair: tuple[Tenant, Tenant],
) -> None:
    victim, attacker = simulator_pair
    sid = _sent(db, settings, "SIM-B")
    impostor = Tenant(
        attacker.tenant,
        {**attacker.credentials, "account_id": victim.credentials["account_id"]},
    )
    assert simulator_post(client, settings, impostor, sid, "SIM-B", "delivered") == 403
    assert load_message(db, sid).status == "sent"


def test_simulator_secrets_are_issued_per_provider_account_never_shared(
    simulator_pair: tuple[Tenant, Tenant],
) -> None:
    victim, attacker = simulator_pair
    assert victim.credentials["signing_secret"] != attacker.credentials["signing_secret"]
    assert victim.credentials["account_id"] != attacker.credentials["account_id"]


# --- replays --------------------------------------------------------------------------------


def test_vonage_receipt_signed_long_ago_is_refused(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "0A00000000000005")
    params = vonage_params(victim, sid, "0A00000000000005", "delivered", timestamp=1_000_000_000)
    assert client.post("/callbacks/vonage", data=params).status_code == 403
    assert load_message(db, sid).status == "sent"


def test_simulator_callback_signed_outside_the_window_is_refused(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    simulator_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = simulator_pair
    sid = _sent(db, settings, "SIM-C")
    stale = int(time.time() - settings.webhook_max_age.total_seconds() - 60)
    assert (
        simulator_post(client, settings, victim, sid, "SIM-C", "delivered", timestamp=stale) == 403
    )
    assert load_message(db, sid).status == "sent"


def test_same_twilio_callback_three_times_is_stored_once(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = twilio_pair
    sid = _sent(db, settings, "SM" + "e" * 32)
    for _ in range(3):
        status = twilio_post(
            client, settings, victim, sid, "SM" + "e" * 32, "delivered", idempotency="idem-1"
        )
        assert status == 204
    callbacks = [event for event in load_events(db, sid) if event.source == "callback"]
    assert [event.provider_status for event in callbacks] == ["delivered"]


def test_same_vonage_receipt_twice_is_stored_once(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "0A00000000000006")
    params = vonage_params(victim, sid, "0A00000000000006", "delivered")
    for _ in range(2):
        assert client.post("/callbacks/vonage", data=params).status_code == 204
    callbacks = [event for event in load_events(db, sid) if event.source == "callback"]
    assert len(callbacks) == 1


# --- multi-part messages --------------------------------------------------------------------


def _receipt(
    client: TestClient[Litestar], signer: Tenant, sid: str, part: str, status: str
) -> None:
    token = signer.credentials[access.CALLBACK_TOKEN]
    params = unsigned_receipt(signer, sid, part, status)
    assert client.get(f"/callbacks/vonage/{token}", params=params).status_code == 204


def test_every_part_id_is_stored(
    db: Database, settings: Settings, vonage_pair: tuple[Tenant, Tenant]
) -> None:
    sid = _sent(db, settings, "P1", parts=("P1", "P2", "P3"))
    with db.transaction() as session:
        stored = session.scalars(
            select(MessagePart.provider_message_id)
            .where(MessagePart.message_sid == sid)
            .order_by(MessagePart.part_index)
        ).all()
    assert stored == ["P1", "P2", "P3"]


def test_multi_part_message_is_delivered_only_when_every_part_is(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "Q1", parts=("Q1", "Q2", "Q3"))
    _receipt(client, victim, sid, "Q1", "delivered")
    _receipt(client, victim, sid, "Q3", "delivered")
    assert load_message(db, sid).status == "sent"
    _receipt(client, victim, sid, "Q2", "delivered")
    assert load_message(db, sid).status == "delivered"


def test_a_failed_part_fails_the_message_once_all_parts_are_final(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "R1", parts=("R1", "R2"))
    _receipt(client, victim, sid, "R2", "failed")
    assert load_message(db, sid).status == "sent"
    _receipt(client, victim, sid, "R1", "delivered")
    assert load_message(db, sid).status == "failed"


def test_partial_send_ends_undelivered_when_the_parts_that_went_out_arrive(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "U1", parts=("U1", "U2"), unsent_parts=1)
    assert load_message(db, sid).status == "sent"
    _receipt(client, victim, sid, "U1", "delivered")
    _receipt(client, victim, sid, "U2", "delivered")
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("undelivered", "partial-send")


def test_part_receipts_that_overtake_the_worker_are_kept(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = vonage_pair
    now = utcnow()
    sid = accept_message(db, settings, now)
    with db.transaction() as session:
        # A text long enough for two SMS parts, as our count at accept says.
        session.execute(update(Message).where(Message.sid == sid).values(segments=2))
        owned = claim(session, sid, settings, now)
        assert owned is not None
    # A part's receipt before the worker records the provider's answer.
    _receipt(client, victim, sid, "V1", "delivered")
    assert load_message(db, sid).status == "sent"  # the provider has it; one part arrived
    with db.transaction() as session:
        record_accepted(session, owned, "V1", "0", utcnow(), parts=("V1", "V2"))
    assert load_message(db, sid).status == "sent"
    _receipt(client, victim, sid, "V2", "delivered")
    assert load_message(db, sid).status == "delivered"


# --- Twilio's opt-out code, and the callback token's rotation -------------------------------


def test_twilio_callback_with_error_21610_records_the_opt_out(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    victim, _ = twilio_pair
    sid = _sent(db, settings, "SM" + "f" * 32)
    status = twilio_post(
        client, settings, victim, sid, "SM" + "f" * 32, "failed", ErrorCode="21610"
    )
    assert status == 204
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("opted_out", "21610")
    with db.transaction() as session:
        opt_outs = session.execute(select(OptOut.sender, OptOut.recipient)).all()
    assert [(row.sender, row.recipient) for row in opt_outs] == [
        (message.from_number, message.to_number)
    ]


def _rotate(db: Database, tenant: str) -> str:
    with db.transaction() as session:
        account = provisioning.get_account(session, tenant)
        row = session.scalars(
            select(ProviderAccount).where(ProviderAccount.account_id == account.id)
        ).one()
        return provisioning.rotate_callback_token(session, row)


@pytest.mark.parametrize(
    ("rotations", "old_token_answers"), [(1, 204), (2, 403)], ids=["once", "twice"]
)
def test_rotated_callback_token_keeps_the_last_one_until_the_next_rotation(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    vonage_pair: tuple[Tenant, Tenant],
    rotations: int,
    old_token_answers: int,
) -> None:
    victim, _ = vonage_pair
    sid = _sent(db, settings, "W1")
    newest = ""
    for _ in range(rotations):
        newest = _rotate(db, TENANT)
    old = victim.credentials[access.CALLBACK_TOKEN]
    params = unsigned_receipt(victim, sid, "W1", "accepted")
    assert client.get(f"/callbacks/vonage/{old}", params=params).status_code == old_token_answers
    params = unsigned_receipt(victim, sid, "W1", "delivered")
    assert client.get(f"/callbacks/vonage/{newest}", params=params).status_code == 204


# --- bounded bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/callbacks/twilio", "/callbacks/vonage", "/callbacks/simulator", "/inbound/twilio"]
)
def test_webhook_body_over_64_kib_is_413_before_any_signature_check(
    client: TestClient[Litestar], demo: Demo, path: str
) -> None:
    body = b"Body=" + b"x" * (64 * 1024)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == 413


def test_inbound_stop_signed_by_another_twilio_account_is_403(
    client: TestClient[Litestar],
    db: Database,
    settings: Settings,
    twilio_pair: tuple[Tenant, Tenant],
) -> None:
    victim, attacker = twilio_pair
    params = {
        "AccountSid": victim.credentials["account_sid"],
        "From": CALLER,
        "To": SENDER,
        "Body": "STOP",
    }
    url = settings.public_base_url + "/inbound/twilio"
    forged = RequestValidator(attacker.credentials["auth_token"]).compute_signature(url, params)
    response = client.post("/inbound/twilio", data=params, headers={"X-Twilio-Signature": forged})
    assert response.status_code == 403
    with db.transaction() as session:
        assert session.scalars(select(OptOut.id)).all() == []
