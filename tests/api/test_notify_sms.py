"""Notify SMS: the caller's own gateway sent the campaign's SMS; we record it and send nothing.

`POST /interact/version/3/account/{accountID}/resources/campaign/sms/notify/{campaignId}` with
`callerId` and `jpToken` marks the call `smsSent` (`smsSentBy: external`) in the report."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import delete, update

from shared.core.db import Database
from shared.core.models import DeflectedCall, InteractionToken, ProviderAccount, utcnow
from tests.support.api import (
    UNAUTHORIZED_BODY,
    V3,
    assert_nothing_placed,
    issue_token,
    other_account_token,
    put_campaign,
    stored_deflected_calls,
)
from tests.support.data import CALLER, KEY, OTHER_KEY, OTHER_TENANT, TENANT, Demo, headers

REPORT = f"{V3}/reports/deflected-calls"


def notify_sms(
    client: TestClient[Litestar],
    body: dict[str, Any] | None = None,
    *,
    campaign: str = "campaign1",
    request_headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a Notify SMS request with a JSON body."""
    return client.post(
        f"{V3}/campaign/sms/notify/{campaign}",
        headers=headers() if request_headers is None else request_headers,
        json=body if body is not None else {},
    )


def recorded_text(token: str, campaign: str = "campaign1") -> str:
    return f"Recorded campaign {{{campaign}}} SMS as sent for jpToken: {token}"


def assert_refused(response: httpx.Response, status: int, text: str) -> None:
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["content-type"].startswith("text/plain")


def the_call(db: Database) -> DeflectedCall:
    [call] = stored_deflected_calls(db)
    return call


def assert_call_untouched(db: Database) -> None:
    call = the_call(db)
    assert (call.sms_sent, call.sms_sent_at, call.sms_sent_by, call.campaign_id) == (
        False,
        None,
        None,
        None,
    )


# 200: recorded as sent


def test_success_answers_the_recorded_text_naming_the_token(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert (response.status_code, response.text) == (200, recorded_text(token))
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("send_at", ["2026-12-24T09:00:00+01:00", "not a time"])
def test_a_send_at_means_nothing_to_a_text_already_sent_and_is_not_read(
    client: TestClient[Litestar], demo: Demo, send_at: str
) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token, "sendAt": send_at})

    assert (response.status_code, response.text) == (200, recorded_text(token))


def test_success_records_no_message_and_queues_nothing(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    assert_nothing_placed(db, redis_url)


def test_success_marks_the_call_sms_sent_by_external_for_the_campaign(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    before = utcnow()

    notify_sms(client, {"callerId": CALLER, "jpToken": token})

    call = the_call(db)
    assert call.sms_sent is True
    assert call.sms_sent_by == "external"
    assert call.sms_sent_at is not None
    assert before <= call.sms_sent_at <= utcnow()
    assert call.campaign_id == "campaign1"


def test_success_leaves_no_message_sid_and_no_delivery_on_the_call(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    notify_sms(client, {"callerId": CALLER, "jpToken": token})

    call = the_call(db)
    assert call.last_message_sid is None
    assert call.sms_delivered_at is None


def test_report_shows_sms_sent_by_external(client: TestClient[Litestar], demo: Demo) -> None:
    token = issue_token(client)
    notify_sms(client, {"callerId": CALLER, "jpToken": token})

    response = client.get(REPORT, headers=headers())

    assert response.status_code == 200, response.text
    [row] = response.json()
    assert row["jpToken"] == token
    assert row["smsSent"] is True
    assert row["smsSentBy"] == "external"
    assert row["smsSentAt"] is not None
    assert row["campaignId"] == "campaign1"
    assert row["messageSid"] is None


def test_notifying_twice_keeps_the_first_sms_sent_at(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    first = notify_sms(client, {"callerId": CALLER, "jpToken": token})
    first_sent_at = the_call(db).sms_sent_at

    second = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.text == recorded_text(token)
    call = the_call(db)
    assert first_sent_at is not None
    assert call.sms_sent_at == first_sent_at
    assert (call.sms_sent, call.sms_sent_by) == (True, "external")


def test_needs_no_provider_settings(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    with db.transaction() as session:
        session.execute(
            delete(ProviderAccount).where(ProviderAccount.account_id == demo.account_id)
        )

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert (response.status_code, response.text) == (200, recorded_text(token))
    assert the_call(db).sms_sent is True
    assert_nothing_placed(db, redis_url)


def test_campaign_in_dev_is_recorded_with_environment_name_dev(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, "dev-only", environment="DEV")
    token = issue_token(client, environment="DEV")

    response = notify_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        campaign="dev-only",
        request_headers=headers(**{"Environment-Name": "DEV"}),
    )

    assert (response.status_code, response.text) == (200, recorded_text(token, "dev-only"))
    assert the_call(db).campaign_id == "dev-only"


def test_a_token_of_another_environment_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, "dev-only", environment="DEV")
    prod_token = issue_token(client)

    response = notify_sms(
        client,
        {"callerId": CALLER, "jpToken": prod_token},
        campaign="dev-only",
        request_headers=headers(**{"Environment-Name": "DEV"}),
    )

    assert (response.status_code, response.text) == (400, "missing or invalid parameter jpToken")


# 400: missing or invalid parameter


def test_missing_jp_token_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    issue_token(client)

    response = notify_sms(client, {"callerId": CALLER})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_call_untouched(db)
    assert_nothing_placed(db, redis_url)


def test_unknown_jp_token_is_400(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": "Aejhib7"})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_call_untouched(db)


def test_jp_token_with_a_nul_byte_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": f"{token}\u0000"})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_call_untouched(db)


def test_jp_token_of_another_account_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    foreign_token = other_account_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": foreign_token})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    # The only call is the other account's: it must not be marked through this account.
    assert_call_untouched(db)


def test_missing_caller_id_is_400(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"jpToken": token})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_call_untouched(db)


# 401, 403, 404


BAD_CREDENTIALS = {
    "missing-application-key": {"Tenant-Id": TENANT},
    "wrong-application-key": headers(key="ffffffffffffffffffffffff"),
    "tenant-id-not-the-url-account": headers(OTHER_TENANT, OTHER_KEY),
    "missing-tenant-id": {"Application-Key": KEY},
}


@pytest.mark.parametrize(
    "request_headers", list(BAD_CREDENTIALS.values()), ids=list(BAD_CREDENTIALS)
)
def test_bad_credentials_are_401_with_reason_header_and_the_seed_json(
    client: TestClient[Litestar], demo: Demo, db: Database, request_headers: dict[str, str]
) -> None:
    token = issue_token(client)

    response = notify_sms(
        client, {"callerId": CALLER, "jpToken": token}, request_headers=request_headers
    )

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert_call_untouched(db)


def test_expired_jp_token_is_403(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    token = issue_token(client, lifetimeSeconds=60)
    with db.transaction() as session:
        session.execute(
            update(InteractionToken)
            .where(InteractionToken.token == token)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_call_untouched(db)


def test_inactive_campaign_is_403(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    token = issue_token(client)
    put_campaign(db, active=False)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_call_untouched(db)


def test_unknown_campaign_is_404(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    token = issue_token(client)

    response = notify_sms(client, {"callerId": CALLER, "jpToken": token}, campaign="nosuch")

    assert_refused(response, 404, "Campaign nosuch was not found")
    assert_call_untouched(db)
