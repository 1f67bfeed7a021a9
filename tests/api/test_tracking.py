"""Tracking: a message by its messageSid, and the Deflected Call Report."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from shared.core.models import utcnow
from tests.support.api import OTHER_V3, UNAUTHORIZED_BODY, V3, other_account_token, send_sms
from tests.support.api import issue_token as issue_demo_token
from tests.support.data import (
    CALLER,
    CALLER_E164,
    KEY,
    OTHER_KEY,
    OTHER_TENANT,
    SENDER,
    Demo,
    headers,
)

REPORT = f"{V3}/reports/deflected-calls"


def placed(client: TestClient[Litestar], token: str) -> str:
    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        request_headers=headers(Accept="application/json"),
    )
    assert response.status_code == 200, response.text
    sid: str = response.json()["messageSid"]
    return sid


def report(
    client: TestClient[Litestar], params: dict[str, str] | None = None, url: str = REPORT
) -> httpx.Response:
    return client.get(url, headers=headers(), params=params)


# GET .../messages/{messageSid}


def test_message_lookup_shows_the_queued_message(client: TestClient[Litestar], demo: Demo) -> None:
    token = issue_demo_token(client)
    sid = placed(client, token)

    response = client.get(f"{V3}/messages/{sid}", headers=headers())

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["messageSid"] == sid
    assert view["status"] == "queued"
    assert view["campaignId"] == "campaign1"
    assert view["to"] == CALLER_E164
    assert view["sender"] == SENDER
    assert f"startedFromSmsToken={token}" in view["body"]


def test_message_of_another_account_is_404_for_it(client: TestClient[Litestar], demo: Demo) -> None:
    sid = placed(client, issue_demo_token(client))

    response = client.get(f"{OTHER_V3}/messages/{sid}", headers=headers(OTHER_TENANT, OTHER_KEY))

    assert (response.status_code, response.text) == (404, f"Message {sid} was not found")


def test_unknown_message_sid_is_404(client: TestClient[Litestar], demo: Demo) -> None:
    sid = "SM" + "0" * 32

    response = client.get(f"{V3}/messages/{sid}", headers=headers())

    assert (response.status_code, response.text) == (404, f"Message {sid} was not found")


def test_message_lookup_with_bad_credentials_is_401(
    client: TestClient[Litestar], demo: Demo
) -> None:
    sid = placed(client, issue_demo_token(client))

    response = client.get(f"{V3}/messages/{sid}", headers=headers(key=OTHER_KEY))

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY


# GET .../reports/deflected-calls


def test_report_lists_the_call_with_sms_not_sent_before_any_worker_ran(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_demo_token(client)
    placed(client, token)

    response = report(client)

    assert response.status_code == 200, response.text
    [row] = response.json()
    assert row["jpToken"] == token
    assert row["callerId"] == CALLER_E164
    assert row["smsSent"] is False
    assert row["smsSentAt"] is None


def test_report_range_given_in_iso8601_with_timezone_includes_the_call(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_demo_token(client)
    now = utcnow()

    response = report(
        client,
        {
            "from": (now - timedelta(hours=1)).isoformat(),
            "to": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )

    assert response.status_code == 200, response.text
    assert [row["jpToken"] for row in response.json()] == [token]


def test_report_range_before_the_call_is_empty(client: TestClient[Litestar], demo: Demo) -> None:
    issue_demo_token(client)
    earlier = utcnow() - timedelta(days=2)

    response = report(client, {"to": earlier.isoformat()})

    assert response.status_code == 200, response.text
    assert response.json() == []


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("from", "2024-01-01T00:00:00"),
        ("from", "yesterday"),
        ("to", "2024-01-01"),
        ("to", "01/02/2024 10:00 +00:00"),
    ],
    ids=["from-without-zone", "from-not-a-time", "to-date-only", "to-not-iso"],
)
def test_report_range_must_be_iso8601_with_a_timezone(
    client: TestClient[Litestar], demo: Demo, parameter: str, value: str
) -> None:
    response = report(client, {parameter: value})

    assert (response.status_code, response.text) == (
        400,
        f"missing or invalid parameter {parameter}",
    )


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("to", "0001-01-01T00:00:00+00:00"),
        ("from", "0001-01-01T00:30:00+01:00"),
        ("from", "9999-12-31T23:30:00-01:00"),
    ],
    ids=["to-at-the-earliest-instant", "from-before-year-1-in-utc", "from-after-year-9999-in-utc"],
)
def test_report_range_at_the_edges_of_the_calendar_is_answered_not_an_internal_error(
    client: TestClient[Litestar], demo: Demo, parameter: str, value: str
) -> None:
    # Valid ISO 8601 times with a zone, at the edge of what Python's datetime can hold (the
    # default start 24 hours earlier, or the same instant in UTC, falls outside it): no call
    # lies in such a range, so the answer is an empty report, or at worst a 400 naming it.
    response = report(client, {parameter: value})

    assert (response.status_code, response.text) in {
        (200, "[]"),
        (400, f"missing or invalid parameter {parameter}"),
    }


@pytest.mark.parametrize("limit", ["0", "10001", "many"], ids=["zero", "above-maximum", "text"])
def test_report_limit_out_of_range_is_400_naming_limit(
    client: TestClient[Litestar], demo: Demo, limit: str
) -> None:
    response = report(client, {"limit": limit})

    assert (response.status_code, response.text) == (400, "missing or invalid parameter limit")


def test_report_of_another_account_does_not_show_this_accounts_calls(
    client: TestClient[Litestar], demo: Demo
) -> None:
    placed(client, issue_demo_token(client))
    foreign_token = other_account_token(client)

    response = client.get(
        f"{OTHER_V3}/reports/deflected-calls", headers=headers(OTHER_TENANT, OTHER_KEY)
    )

    assert response.status_code == 200, response.text
    assert [row["jpToken"] for row in response.json()] == [foreign_token]


def test_report_with_bad_credentials_is_401(client: TestClient[Litestar], demo: Demo) -> None:
    response = client.get(REPORT, headers={"Tenant-Id": demo.tenant, "Application-Key": KEY[::-1]})

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
