"""Send SMS API v3 over REST: every row of the seed's response table, with its exact text.

A 200 means the message is committed in PostgreSQL and its send task is on Redis; every
refusal leaves neither behind."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from urllib.parse import quote

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import delete, update

from shared.accounts import provisioning
from shared.core.db import Database
from shared.core.models import InteractionToken, MessageStatus, ProviderAccount, utcnow
from tests.support.api import (
    CAMPAIGN_LINK,
    PROVIDER_NOT_DEFINED,
    UNAUTHORIZED_BODY,
    V3,
    assert_nothing_placed,
    issue_token,
    other_account_token,
    put_campaign,
    queued_sends,
    queued_tasks,
    send_sms,
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

PLACED = re.compile(r"^Placed campaign \{campaign1\} in SMS queue messageSid: (SM[0-9a-f]{32})$")
SYSTEM_SENDER = "+12025550199"


def placed_sid(text: str) -> str:
    match = PLACED.fullmatch(text)
    assert match is not None, text
    return match.group(1)


def assert_refused(response: httpx.Response, status: int, text: str) -> None:
    """The seed's refusal: exactly this status and this plain text."""
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["content-type"].startswith("text/plain")


# 200: placed in the SMS queue


def test_success_answers_the_seed_text_as_plain_text(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert PLACED.fullmatch(response.text), response.text


def test_success_answers_json_when_the_caller_accepts_json(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_token(client)

    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        request_headers=headers(Accept="application/json"),
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"messageSid", "message"}
    assert placed_sid(answer["message"]) == answer["messageSid"]


def test_success_records_the_message_queued_for_the_caller_in_e164(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    [message] = stored_messages(db)
    assert message.sid == placed_sid(response.text)
    assert message.account_id == demo.account_id
    assert message.campaign_id == "campaign1"
    assert message.status == MessageStatus.QUEUED.value
    assert message.to_number == CALLER_E164
    assert message.provider == "simulator"


def test_success_renders_the_link_with_additional_params_and_the_token(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token, "additionalParams": "var1=value1&var2=value"},
    )

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.body == (
        f"Please click here {CAMPAIGN_LINK}&var1=value1&var2=value&startedFromSmsToken={token}"
    )


def test_success_is_published_with_exactly_one_task_on_the_send_queue(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    # Marked published off the request path, in the API's next batch of marks.
    wait_until(lambda: stored_messages(db)[0].published_at is not None, 5, "the mark")
    assert queued_tasks(redis_url) == 1
    assert queued_sends(redis_url) == [("sms.send", [message.sid])]


def test_success_sends_from_the_accounts_first_sender_when_from_is_absent(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    send_sms(client, {"callerId": CALLER, "jpToken": token})

    [message] = stored_messages(db)
    assert message.from_number == SENDER


def test_from_may_name_any_sender_of_the_account(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"from": "ACME", "callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.from_number == "ACME"


def test_caller_id_in_the_path_form_of_the_sample_is_sent_to(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = client.post(
        f"{V3}/campaign/sms/campaign1/callerid/{quote(CALLER, safe='')}",
        headers=headers(),
        json={"jpToken": token, "additionalParams": "var1=value1&var2=value"},
    )

    assert response.status_code == 200, response.text
    assert PLACED.fullmatch(response.text), response.text
    [message] = stored_messages(db)
    assert message.to_number == CALLER_E164


def test_path_form_accepts_a_body_caller_id_that_is_the_same_number(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = client.post(
        f"{V3}/campaign/sms/campaign1/callerid/{quote(CALLER_E164, safe='')}",
        headers=headers(),
        json={"callerId": CALLER, "jpToken": token},
    )

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.to_number == CALLER_E164


def test_path_caller_id_differing_from_the_body_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = client.post(
        f"{V3}/campaign/sms/campaign1/callerid/{quote('+12025550143', safe='')}",
        headers=headers(),
        json={"callerId": CALLER, "jpToken": token},
    )

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


# 400: missing or invalid parameter <parameter>


def test_missing_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"jpToken": token})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


def test_unparseable_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": "not-a-number", "jpToken": token})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


def test_caller_id_of_the_wrong_json_type_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": {"number": CALLER}, "jpToken": token})

    assert_refused(response, 400, "missing or invalid parameter callerId")
    assert_nothing_placed(db, redis_url)


def test_missing_jp_token_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms(client, {"callerId": CALLER})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_nothing_placed(db, redis_url)


def test_unknown_jp_token_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms(client, {"callerId": CALLER, "jpToken": "Aejhib7"})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_nothing_placed(db, redis_url)


def test_jp_token_of_another_account_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    foreign_token = other_account_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": foreign_token})

    assert_refused(response, 400, "missing or invalid parameter jpToken")
    assert_nothing_placed(db, redis_url)


def test_malformed_json_body_is_400_naming_body(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms(client, content=b'{"callerId": "+972 54 4696388", "jpToken": ')

    assert_refused(response, 400, "missing or invalid parameter body")
    assert_nothing_placed(db, redis_url)


def test_json_array_body_is_400_naming_body(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(
        client, content=json.dumps([{"callerId": CALLER, "jpToken": token}]).encode()
    )

    assert_refused(response, 400, "missing or invalid parameter body")
    assert_nothing_placed(db, redis_url)


def test_from_the_account_does_not_own_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    # +12025550143 is a sender of the other account, not of this one.
    response = send_sms(client, {"from": "+12025550143", "callerId": CALLER, "jpToken": token})

    assert_refused(response, 400, "missing or invalid parameter from")
    assert_nothing_placed(db, redis_url)


def test_additional_params_that_are_not_a_query_string_are_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    # A field without "=" is refused by parse_qsl(strict_parsing=True).
    response = send_sms(
        client, {"callerId": CALLER, "jpToken": token, "additionalParams": "novalue"}
    )

    assert_refused(response, 400, "missing or invalid parameter additionalParams")
    assert_nothing_placed(db, redis_url)


def test_unknown_environment_name_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        request_headers=headers(**{"Environment-Name": "STAGING"}),
    )

    assert_refused(response, 400, "missing or invalid parameter Environment-Name")
    assert_nothing_placed(db, redis_url)


# 401: invalid security headers


BAD_CREDENTIALS = {
    "missing-tenant-id": {"Application-Key": KEY},
    "missing-application-key": {"Tenant-Id": TENANT},
    "wrong-application-key": headers(key="ffffffffffffffffffffffff"),
    "tenant-id-not-the-url-account": headers(OTHER_TENANT, OTHER_KEY),
    "other-accounts-key-on-this-account": headers(TENANT, OTHER_KEY),
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
    token = issue_token(client)

    response = send_sms(
        client, {"callerId": CALLER, "jpToken": token}, request_headers=request_headers
    )

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert_nothing_placed(db, redis_url)


def test_credentials_are_checked_before_the_body(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms(client, content=b"{not json", request_headers={"Tenant-Id": TENANT})

    assert response.status_code == 401
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert_nothing_placed(db, redis_url)


# 403: Token expired (outdated campaign or interaction session)


def test_expired_jp_token_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client, lifetimeSeconds=60)
    with db.transaction() as session:
        session.execute(
            update(InteractionToken)
            .where(InteractionToken.token == token)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_inactive_campaign_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    put_campaign(db, active=False)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_campaign_past_its_valid_until_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    put_campaign(db, valid_until=utcnow() - timedelta(minutes=1))

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_campaign_before_its_valid_from_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    put_campaign(db, valid_from=utcnow() + timedelta(hours=1))

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 403, "Token expired")
    assert_nothing_placed(db, redis_url)


def test_campaign_inside_its_validity_window_is_sent(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    now = utcnow()
    put_campaign(db, valid_from=now - timedelta(hours=1), valid_until=now + timedelta(hours=1))

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    assert len(stored_messages(db)) == 1


# 404: Campaign <campaign id> was not found


def test_unknown_campaign_is_404(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token}, campaign="nosuch")

    assert_refused(response, 404, "Campaign nosuch was not found")
    assert_nothing_placed(db, redis_url)


def test_campaign_only_in_dev_is_404_without_environment_name(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, "dev-only", environment="DEV")
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token}, campaign="dev-only")

    assert_refused(response, 404, "Campaign dev-only was not found")
    assert_nothing_placed(db, redis_url)


def test_campaign_only_in_dev_is_sent_with_environment_name_dev(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, "dev-only", environment="DEV")
    token = issue_token(client, environment="DEV")

    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        campaign="dev-only",
        request_headers=headers(**{"Environment-Name": "DEV"}),
    )

    assert response.status_code == 200, response.text
    assert re.fullmatch(
        r"Placed campaign \{dev-only\} in SMS queue messageSid: SM[0-9a-f]{32}", response.text
    )
    [message] = stored_messages(db)
    assert message.campaign_id == "dev-only"
    assert queued_tasks(redis_url) == 1


# 500: telephony provider not defined (missing or expired settings)


def test_account_without_provider_settings_is_500(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    with db.transaction() as session:
        session.execute(
            delete(ProviderAccount).where(ProviderAccount.account_id == demo.account_id)
        )

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 500, PROVIDER_NOT_DEFINED)
    assert_nothing_placed(db, redis_url)


def test_expired_provider_settings_are_500(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        provisioning.set_provider(
            session,
            account,
            "simulator",
            sender_ids=[SENDER, "ACME"],
            expires_at=utcnow() - timedelta(minutes=1),
        )

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 500, PROVIDER_NOT_DEFINED)
    assert_nothing_placed(db, redis_url)


def _create_system_account(db: Database) -> int:
    with db.transaction() as session:
        system = provisioning.create_account(session, "system", "System")
        settings = provisioning.set_provider(
            session, system, "simulator", sender_ids=[SYSTEM_SENDER]
        )
        return settings.id


def test_account_without_provider_settings_sends_from_the_system_account(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    with db.transaction() as session:
        session.execute(
            delete(ProviderAccount).where(ProviderAccount.account_id == demo.account_id)
        )
    system_settings_id = _create_system_account(db)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.from_number == SYSTEM_SENDER
    assert message.provider_account_id == system_settings_id
    assert message.account_id == demo.account_id
    assert queued_tasks(redis_url) == 1


def test_expired_own_provider_settings_are_500_even_with_a_system_account(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    with db.transaction() as session:
        session.execute(
            update(ProviderAccount)
            .where(ProviderAccount.account_id == demo.account_id)
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )
    _create_system_account(db)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 500, PROVIDER_NOT_DEFINED)
    assert_nothing_placed(db, redis_url)


# 500: exception (general error)


def test_unexpected_error_is_500_exception_and_records_nothing(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, link_url="http://[::1")  # urlsplit raises ValueError on it
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert_refused(response, 500, "exception")
    assert_nothing_placed(db, redis_url)


# Idempotency-Key


def test_same_idempotency_key_replays_the_same_message_sid(
    client: TestClient[Litestar], demo: Demo
) -> None:
    token = issue_token(client)
    body = {"callerId": CALLER, "jpToken": token}
    keyed = headers(**{"Idempotency-Key": "call-42"})

    first = send_sms(client, body, request_headers=keyed)
    second = send_sms(client, body, request_headers=keyed)

    assert (first.status_code, second.status_code) == (200, 200)
    assert placed_sid(second.text) == placed_sid(first.text)
    assert "Idempotency-Replay" not in first.headers
    assert second.headers["Idempotency-Replay"] == "true"


def test_idempotent_replay_records_and_publishes_one_message_only(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    body = {"callerId": CALLER, "jpToken": token}
    keyed = headers(**{"Idempotency-Key": "call-42"})

    send_sms(client, body, request_headers=keyed)
    send_sms(client, body, request_headers=keyed)

    assert len(stored_messages(db)) == 1
    assert queued_tasks(redis_url) == 1


def test_same_idempotency_key_with_a_different_body_is_422(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    keyed = headers(**{"Idempotency-Key": "call-42"})
    first = send_sms(client, {"callerId": CALLER, "jpToken": token}, request_headers=keyed)

    second = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token, "additionalParams": "var1=other"},
        request_headers=keyed,
    )

    assert first.status_code == 200, first.text
    assert second.status_code == 422
    assert second.text == "Idempotency-Key was already used with a different request"
    assert [m.sid for m in stored_messages(db)] == [placed_sid(first.text)]
    assert queued_tasks(redis_url) == 1


def test_different_idempotency_keys_place_different_messages(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    body = {"callerId": CALLER, "jpToken": token}

    first = send_sms(client, body, request_headers=headers(**{"Idempotency-Key": "a"}))
    second = send_sms(client, body, request_headers=headers(**{"Idempotency-Key": "b"}))

    assert placed_sid(first.text) != placed_sid(second.text)
    assert len(stored_messages(db)) == 2
    assert queued_tasks(redis_url) == 2


def test_idempotency_keys_are_scoped_to_the_account(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    keyed = {"Idempotency-Key": "shared-key"}
    mine = send_sms(
        client,
        {"callerId": CALLER, "jpToken": issue_token(client)},
        request_headers=headers(**keyed),
    )
    theirs = client.post(
        f"/interact/version/3/account/{OTHER_TENANT}/resources/campaign/sms/other-campaign",
        headers=headers(OTHER_TENANT, OTHER_KEY, **keyed),
        json={"callerId": CALLER, "jpToken": other_account_token(client)},
    )

    assert (mine.status_code, theirs.status_code) == (200, 200), theirs.text
    assert "Idempotency-Replay" not in theirs.headers
    assert len(stored_messages(db)) == 2
    assert queued_tasks(redis_url) == 2


def test_overlong_idempotency_key_is_400_naming_it(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": token},
        request_headers=headers(**{"Idempotency-Key": "k" * 256}),
    )

    assert_refused(response, 400, "missing or invalid parameter Idempotency-Key")
    assert_nothing_placed(db, redis_url)


def test_credentials_are_checked_before_an_overlong_idempotency_key(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = send_sms(
        client,
        {"callerId": CALLER, "jpToken": "Aejhib7"},
        request_headers={"Idempotency-Key": "k" * 256},
    )

    assert response.status_code == 401, response.text
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert_nothing_placed(db, redis_url)
