"""generateToken: the per-call jpToken Send SMS v3 requires, and the call's deflection row."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from shared.core.db import Database
from tests.support.api import UNAUTHORIZED_BODY, V3, stored_deflected_calls
from tests.support.data import (
    CALLER,
    CALLER_E164,
    KEY,
    OTHER_KEY,
    OTHER_TENANT,
    TENANT,
    Demo,
    headers,
)

TOKEN_URL = f"{V3}/token"
WEEK = 7 * 24 * 3600  # the service's longest token lifetime (token_max_lifetime)


def generate(
    client: TestClient[Litestar], body: object, request_headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(
        TOKEN_URL, headers=headers() if request_headers is None else request_headers, json=body
    )


def test_returns_a_seven_character_alphanumeric_jp_token(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = generate(client, {"callerId": CALLER})

    assert response.status_code == 200, response.text
    assert re.fullmatch(r"[A-Za-z0-9]{7}", response.json()["jpToken"])


def test_returns_the_caller_id_in_e164(client: TestClient[Litestar], demo: Demo) -> None:
    response = generate(client, {"callerId": CALLER})

    assert response.json()["callerId"] == CALLER_E164


def test_expires_after_it_was_issued(client: TestClient[Litestar], demo: Demo) -> None:
    answer = generate(client, {"callerId": CALLER}).json()

    issued = datetime.fromisoformat(answer["issuedAt"])
    expires = datetime.fromisoformat(answer["expiresAt"])
    assert issued.tzinfo is not None
    assert expires > issued


def test_lifetime_seconds_sets_how_long_the_token_lives(
    client: TestClient[Litestar], demo: Demo
) -> None:
    answer = generate(client, {"callerId": CALLER, "lifetimeSeconds": 90}).json()

    issued = datetime.fromisoformat(answer["issuedAt"])
    expires = datetime.fromisoformat(answer["expiresAt"])
    assert expires - issued == timedelta(seconds=90)


def test_tokens_are_unique_per_call(client: TestClient[Litestar], demo: Demo) -> None:
    tokens = {generate(client, {"callerId": CALLER}).json()["jpToken"] for _ in range(5)}

    assert len(tokens) == 5


@pytest.mark.parametrize(
    "caller_id", ["not-a-number", "", {"number": CALLER}], ids=["unparseable", "blank", "object"]
)
def test_bad_caller_id_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, caller_id: object
) -> None:
    response = generate(client, {"callerId": caller_id})

    assert (response.status_code, response.text) == (400, "missing or invalid parameter callerId")
    assert stored_deflected_calls(db) == []


def test_missing_caller_id_is_400(client: TestClient[Litestar], demo: Demo) -> None:
    response = generate(client, {})

    assert (response.status_code, response.text) == (400, "missing or invalid parameter callerId")


@pytest.mark.parametrize(
    "lifetime", [0, -60, WEEK + 1, "60", 1.5], ids=["zero", "negative", "too-long", "text", "float"]
)
def test_lifetime_seconds_out_of_range_or_not_an_integer_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, lifetime: object
) -> None:
    response = generate(client, {"callerId": CALLER, "lifetimeSeconds": lifetime})

    assert (response.status_code, response.text) == (
        400,
        "missing or invalid parameter lifetimeSeconds",
    )
    assert stored_deflected_calls(db) == []


def test_absurdly_long_lifetime_seconds_is_400_not_an_internal_error(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    # 10**15 s is beyond what datetime.timedelta can hold; it is just "too long".
    response = generate(client, {"callerId": CALLER, "lifetimeSeconds": 10**15})

    assert (response.status_code, response.text) == (
        400,
        "missing or invalid parameter lifetimeSeconds",
    )
    assert stored_deflected_calls(db) == []


def test_malformed_json_body_is_400_naming_body(client: TestClient[Litestar], demo: Demo) -> None:
    response = client.post(
        TOKEN_URL,
        headers={**headers(), "Content-Type": "application/json"},
        content=b'{"callerId": ',
    )

    assert (response.status_code, response.text) == (400, "missing or invalid parameter body")


def test_unknown_environment_name_is_400(client: TestClient[Litestar], demo: Demo) -> None:
    response = generate(client, {"callerId": CALLER}, headers(**{"Environment-Name": "STAGING"}))

    assert (response.status_code, response.text) == (
        400,
        "missing or invalid parameter Environment-Name",
    )


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
    client: TestClient[Litestar], demo: Demo, db: Database, request_headers: dict[str, str]
) -> None:
    response = generate(client, {"callerId": CALLER}, request_headers)

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert stored_deflected_calls(db) == []


def test_opens_the_calls_deflected_call_row_with_sms_not_sent(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    answer = generate(client, {"callerId": CALLER}).json()

    [call] = stored_deflected_calls(db)
    assert call.account_id == demo.account_id
    assert call.sms_sent is False
    assert call.sms_sent_at is None
    assert call.last_message_sid is None
    assert call.token_issued_at == datetime.fromisoformat(answer["issuedAt"])
