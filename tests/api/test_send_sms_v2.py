"""Send SMS API v2 over REST: as v3 without a jpToken, and without touching the call's report row.

`POST /interact/version/2/account/{accountID}/resources/campaign/sms/{campaignId}` with `from`?,
`callerId` and `additionalParams`?: the same success text and the same refusals as v3."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import delete, select

from shared.core.db import Database
from shared.core.models import DeflectedCall, MessageStatus, ProviderAccount, utcnow
from shared.messages.lifecycle import StatusReport, apply_status
from tests.support.api import (
    CAMPAIGN_LINK,
    PROVIDER_NOT_DEFINED,
    UNAUTHORIZED_BODY,
    assert_nothing_placed,
    issue_token,
    put_campaign,
    queued_sends,
    stored_messages,
)
from tests.support.data import (
    CALLER,
    CALLER_E164,
    KEY,
    OTHER_KEY,
    OTHER_TENANT,
    SENDER,
    TENANT,
    Demo,
    headers,
)
from tests.support.processes import wait_until

V2 = f"/interact/version/2/account/{TENANT}/resources"
PLACED = re.compile(r"^Placed campaign \{campaign1\} in SMS queue messageSid: (SM[0-9a-f]{32})$")


def send_sms_v2(
    client: TestClient[Litestar],
    body: dict[str, Any] | None = None,
    *,
    campaign: str = "campaign1",
    request_headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a Send SMS v2 request with a JSON body."""
    return client.post(
        f"{V2}/campaign/sms/{campaign}",
        headers=headers() if request_headers is None else request_headers,
        json=body if body is not None else {},
    )


def placed_sid(text: str) -> str:
    match = PLACED.fullmatch(text)
    assert match is not None, text
    return match.group(1)


def assert_refused(response: httpx.Response, status: int, text: str) -> None:
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["content-type"].startswith("text/plain")


@dataclass(frozen=True)
class CallRow:
    """Every column of a deflected_calls row, to compare before and after."""

    sms_sent: bool
    sms_sent_at: datetime | None
    sms_sent_by: str | None
    sms_delivered_at: datetime | None
    last_message_sid: str | None
    campaign_id: str | None
    link_clicks: int
    link_first_clicked_at: datetime | None


def call_rows(db: Database) -> list[CallRow]:
    with db.transaction() as session:
        return [
            CallRow(
                sms_sent=call.sms_sent,
                sms_sent_at=call.sms_sent_at,
                sms_sent_by=call.sms_sent_by,
                sms_delivered_at=call.sms_delivered_at,
                last_message_sid=call.last_message_sid,
                campaign_id=call.campaign_id,
                link_clicks=call.link_clicks,
                link_first_clicked_at=call.link_first_clicked_at,
            )
            for call in session.scalars(select(DeflectedCall).order_by(DeflectedCall.token_id))
        ]


# 200: placed in the SMS queue, without a jpToken


def test_success_without_a_jp_token_answers_the_placed_text(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert PLACED.fullmatch(response.text), response.text


def test_success_records_a_queued_message_to_the_caller_in_e164_without_a_token(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER})

    [message] = stored_messages(db)
    assert message.sid == placed_sid(response.text)
    assert message.campaign_id == "campaign1"
    assert message.status == MessageStatus.QUEUED.value
    assert message.to_number == CALLER_E164
    assert message.from_number == SENDER
    assert message.token_id is None


def test_success_is_published_with_one_task_on_the_send_queue(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    send_sms_v2(client, {"callerId": CALLER})

    [message] = stored_messages(db)
    # Marked published off the request path, in the API's next batch of marks.
    wait_until(lambda: stored_messages(db)[0].published_at is not None, 5, "the mark")
    assert queued_sends(redis_url) == [("sms.send", [message.sid])]


def test_body_carries_the_campaign_link_without_a_token_parameter(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    send_sms_v2(client, {"callerId": CALLER})

    [message] = stored_messages(db)
    assert message.body == f"Please click here {CAMPAIGN_LINK}"


def test_additional_params_are_appended_to_the_link(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = send_sms_v2(
        client, {"callerId": CALLER, "additionalParams": "var1=value1&var2=value2"}
    )

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.body == f"Please click here {CAMPAIGN_LINK}&var1=value1&var2=value2"


def test_from_may_name_any_sender_of_the_account(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = send_sms_v2(client, {"from": "ACME", "callerId": CALLER})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.from_number == "ACME"


def test_success_answers_json_when_the_caller_accepts_json(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = send_sms_v2(
        client, {"callerId": CALLER}, request_headers=headers(Accept="application/json")
    )

    assert response.status_code == 200, response.text
    answer = response.json()
    assert placed_sid(answer["message"]) == answer["messageSid"]


# A jpToken in a v2 body is ignored


def test_a_jp_token_in_the_body_is_not_attached_to_the_message(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = send_sms_v2(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.token_id is None
    assert "startedFromSmsToken" not in message.body
    assert message.body == f"Please click here {CAMPAIGN_LINK}"


def test_an_unknown_jp_token_in_the_body_is_ignored_not_refused(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER, "jpToken": "Aejhib7"})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.token_id is None


def test_a_jp_token_of_the_wrong_json_type_is_ignored_not_refused(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER, "jpToken": {"token": "Aejhib7"}})

    assert response.status_code == 200, response.text
    assert len(stored_messages(db)) == 1


def test_a_v2_send_leaves_the_calls_report_row_unchanged(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    before = call_rows(db)

    response = send_sms_v2(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    assert call_rows(db) == before


def test_a_v2_message_sent_and_delivered_leaves_the_calls_report_row_unchanged(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    before = call_rows(db)
    sid = placed_sid(send_sms_v2(client, {"callerId": CALLER, "jpToken": token}).text)

    # What the worker and the provider's receipt do once the message goes out.
    with db.transaction() as session:
        assert apply_status(
            session, sid, StatusReport(MessageStatus.SENT, source="worker"), utcnow()
        )
    with db.transaction() as session:
        assert apply_status(
            session, sid, StatusReport(MessageStatus.DELIVERED, source="callback"), utcnow()
        )

    [message] = stored_messages(db)
    assert message.status == MessageStatus.DELIVERED.value
    assert call_rows(db) == before


# The v3 refusals that apply to v2


def test_missing_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms_v2(client, {"additionalParams": "var1=value1"})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


def test_unparseable_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms_v2(client, {"callerId": "not-a-number"})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


def test_from_the_account_does_not_own_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms_v2(client, {"from": "+12025550143", "callerId": CALLER})

    assert_refused(response, 400, "missing or invalid parameter from")
    assert_nothing_placed(db, redis_url)


def test_additional_params_that_are_not_a_query_string_are_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER, "additionalParams": "novalue"})

    assert_refused(response, 400, "missing or invalid parameter additionalParams")
    assert_nothing_placed(db, redis_url)


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
    client: TestClient[Litestar],
    demo: Demo,
    db: Database,
    redis_url: str,
    request_headers: dict[str, str],
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER}, request_headers=request_headers)

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert_nothing_placed(db, redis_url)


def test_inactive_campaign_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, active=False)

    response = send_sms_v2(client, {"callerId": CALLER})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_campaign_past_its_valid_until_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, valid_until=utcnow() - timedelta(minutes=1))

    response = send_sms_v2(client, {"callerId": CALLER})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_unknown_campaign_is_404(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms_v2(client, {"callerId": CALLER}, campaign="nosuch")

    assert_refused(response, 404, "Campaign nosuch was not found")
    assert_nothing_placed(db, redis_url)


def test_account_without_provider_settings_is_500(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    with db.transaction() as session:
        session.execute(
            delete(ProviderAccount).where(ProviderAccount.account_id == demo.account_id)
        )

    response = send_sms_v2(client, {"callerId": CALLER})

    assert_refused(response, 500, PROVIDER_NOT_DEFINED)
    assert_nothing_placed(db, redis_url)


def test_a_refused_v2_send_leaves_the_calls_report_row_unchanged(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    before = call_rows(db)

    response = send_sms_v2(client, {"jpToken": token})

    assert response.status_code == 400
    assert call_rows(db) == before
