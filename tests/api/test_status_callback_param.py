"""`statusCallback` (issue 14): on a single send's body, a bulk request's query, or a campaign;
checked when accepted (a 400 in the seed's words), stored with each message, shown in the
lookup to its own account only; through the API in process on the real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select, update

from shared.core.db import Database
from shared.core.models import BulkBatch, Campaign
from shared.core.settings import Settings
from tests.support.api import V3, assert_nothing_placed, issue_token, send_sms, stored_messages
from tests.support.data import CALLER, OTHER_KEY, OTHER_TENANT, Demo, headers

HOOK = "https://hooks.example.com/sms/status?tenant=a"
BULK = f"{V3}/campaign/sms/campaign1/bulk"


def _send(client: TestClient[Litestar], **extra: str) -> str:
    response = send_sms(client, {"callerId": CALLER, "jpToken": issue_token(client), **extra})
    assert response.status_code == 200, response.text
    return response.text.rpartition(" ")[2]


def test_a_send_s_status_callback_is_stored_and_shown_in_its_lookup(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    sid = _send(client, statusCallback=HOOK)
    [message] = stored_messages(db)
    assert message.status_callback == HOOK
    shown = client.get(f"{V3}/messages/{sid}", headers=headers()).json()
    assert shown["statusCallback"] == HOOK
    assert shown["callbacks"] == []  # nothing has changed yet
    # Another account cannot see it at all.
    stranger = client.get(
        f"/interact/version/3/account/{OTHER_TENANT}/resources/messages/{sid}",
        headers=headers(OTHER_TENANT, OTHER_KEY),
    )
    assert stranger.status_code == 404


def test_a_password_in_the_callback_url_is_kept_but_never_shown(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    sid = _send(client, statusCallback="https://bob:s3cret@hooks.example.com/x")
    [message] = stored_messages(db)
    assert message.status_callback == "https://bob:s3cret@hooks.example.com/x"
    shown = client.get(f"{V3}/messages/{sid}", headers=headers()).text
    assert "s3cret" not in shown
    assert "https://bob:***@hooks.example.com/x" in shown


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "not a url", "https://", "https://example.com:0/", 42]
)
def test_an_unusable_status_callback_is_the_seeds_400_and_nothing_is_placed(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str, url: object
) -> None:
    token = issue_token(client)
    response = send_sms(client, {"callerId": CALLER, "jpToken": token, "statusCallback": url})
    assert response.status_code == 400
    assert response.text == "missing or invalid parameter statusCallback"
    assert_nothing_placed(db, redis_url)


@pytest.fixture
def strict_client(migrated: Settings, db: Database) -> Iterator[TestClient[Litestar]]:
    """The API of an operator who allows no internal network (the default)."""
    from api.app import create_app

    strict = migrated.model_copy(update={"status_callback_allowed_networks": ""})
    with TestClient(app=create_app(strict)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/admin",
        "http://localhost/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://[::1]/x",
    ],
)
def test_an_internal_address_is_refused_unless_the_operator_allows_it(
    strict_client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str, url: str
) -> None:
    token = issue_token(strict_client)
    response = send_sms(
        strict_client, {"callerId": CALLER, "jpToken": token, "statusCallback": url}
    )
    assert response.status_code == 400
    assert response.text == "missing or invalid parameter statusCallback"
    assert_nothing_placed(db, redis_url)


def test_a_campaign_s_callback_serves_sends_that_name_none_and_a_send_s_own_wins(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    with db.transaction() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.campaign_id == "campaign1")
            .values(status_callback="https://campaign.example.com/hook")
        )
    plain = _send(client)
    own = _send(client, statusCallback=HOOK)
    by_sid = {m.sid: m.status_callback for m in stored_messages(db)}
    assert by_sid == {plain: "https://campaign.example.com/hook", own: HOOK}


def test_the_same_idempotency_key_with_another_callback_is_a_different_request(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    keyed = headers(**{"Idempotency-Key": "k-1"})
    body = {"callerId": CALLER, "jpToken": token, "statusCallback": HOOK}
    first = send_sms(client, body, request_headers=keyed)
    again = send_sms(client, body, request_headers=keyed)
    other = send_sms(client, {**body, "statusCallback": HOOK + "&b"}, request_headers=keyed)
    assert first.status_code == again.status_code == 200
    assert again.text == first.text
    assert other.status_code == 422, other.text
    assert len(stored_messages(db)) == 1


def test_a_bulk_batch_s_callback_goes_to_every_message_and_shows_in_its_progress(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = client.post(
        BULK,
        params={"statusCallback": HOOK},
        headers=headers(),
        json=[{"callerId": "+972544696388"}, {"callerId": "+972544696389"}],
    )
    assert response.status_code == 202, response.text
    batch_id = response.json()["batchId"]
    assert {m.status_callback for m in stored_messages(db)} == {HOOK}
    with db.transaction() as session:
        assert session.scalar(select(BulkBatch.status_callback)) == HOOK
    progress = client.get(f"{BULK}/{batch_id}", headers=headers()).json()
    assert progress["statusCallback"] == HOOK


def test_a_bulk_request_with_an_unusable_callback_is_refused_whole(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = client.post(
        BULK,
        params={"statusCallback": "gopher://example.com/"},
        headers=headers(),
        json=[{"callerId": "+972544696388"}],
    )
    assert response.status_code == 400
    assert response.text == "missing or invalid parameter statusCallback"
    assert_nothing_placed(db, redis_url)
