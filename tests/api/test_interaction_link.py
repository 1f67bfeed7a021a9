"""Get Interaction Link: the campaign's link as text, for callers with their own SMS gateway.

`POST /interact/version/2/account/{accountID}/resources/campaign/url/{campaignId}` with
`additionalParams`? and `shortenUrl`?; a short link is `<public base URL>/l/<code>` and
redirects (302) to the full link until it expires."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select, update

from shared.core.db import Database
from shared.core.models import ShortLink, utcnow
from shared.core.settings import Settings
from tests.support.api import (
    CAMPAIGN_LINK,
    UNAUTHORIZED_BODY,
    assert_nothing_placed,
    put_campaign,
)
from tests.support.data import KEY, OTHER_KEY, OTHER_TENANT, TENANT, Demo, headers

V2 = f"/interact/version/2/account/{TENANT}/resources"


def get_link(
    client: TestClient[Litestar],
    body: dict[str, Any] | None = None,
    *,
    campaign: str = "campaign1",
    request_headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a Get Interaction Link request with a JSON body."""
    return client.post(
        f"{V2}/campaign/url/{campaign}",
        headers=headers() if request_headers is None else request_headers,
        json=body if body is not None else {},
    )


def short_link_pattern(settings: Settings) -> re.Pattern[str]:
    base = re.escape(settings.public_base_url.rstrip("/"))
    return re.compile(rf"^{base}/l/([A-Za-z0-9]{{8}})$")


def short_code(settings: Settings, url: str) -> str:
    match = short_link_pattern(settings).fullmatch(url)
    assert match is not None, url
    return match.group(1)


def follow(client: TestClient[Litestar], code: str) -> httpx.Response:
    return client.get(f"/l/{code}", follow_redirects=False)


def stored_short_links(db: Database) -> list[ShortLink]:
    with db.transaction() as session:
        return list(session.scalars(select(ShortLink)))


def assert_refused(response: httpx.Response, status: int, text: str) -> None:
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["content-type"].startswith("text/plain")


# 200: the link as text


def test_answers_the_campaign_link_as_plain_text(client: TestClient[Litestar], demo: Demo) -> None:
    response = get_link(client)

    assert (response.status_code, response.text) == (200, CAMPAIGN_LINK)
    assert response.headers["content-type"].startswith("text/plain")


def test_answers_the_link_for_an_empty_body(client: TestClient[Litestar], demo: Demo) -> None:
    response = client.post(f"{V2}/campaign/url/campaign1", headers=headers())

    assert (response.status_code, response.text) == (200, CAMPAIGN_LINK)


def test_additional_params_are_appended_to_the_link(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = get_link(client, {"additionalParams": "var1=value1"})

    assert (response.status_code, response.text) == (200, f"{CAMPAIGN_LINK}&var1=value1")


def test_several_additional_params_are_appended_in_order(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = get_link(client, {"additionalParams": "var1=value1&var2=value2"})

    assert response.text == "https://flows.example.com/start?lang=en&var1=value1&var2=value2"


def test_the_link_carries_no_token_parameter(client: TestClient[Litestar], demo: Demo) -> None:
    response = get_link(client, {"additionalParams": "var1=value1"})

    assert "startedFromSmsToken" not in response.text


def test_shorten_url_false_answers_the_full_link(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    response = get_link(client, {"shortenUrl": False})

    assert (response.status_code, response.text) == (200, CAMPAIGN_LINK)
    assert stored_short_links(db) == []


def test_nothing_is_queued_or_recorded_as_a_message(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    response = get_link(client, {"shortenUrl": True})

    assert response.status_code == 200, response.text
    assert_nothing_placed(db, redis_url)


# shortenUrl


def test_shorten_url_true_answers_a_short_link_on_the_public_base_url(
    client: TestClient[Litestar], demo: Demo, migrated: Settings
) -> None:
    response = get_link(client, {"shortenUrl": True})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert short_link_pattern(migrated).fullmatch(response.text), response.text


def test_shorten_url_as_the_string_true_answers_a_short_link(
    client: TestClient[Litestar], demo: Demo, migrated: Settings
) -> None:
    response = get_link(client, {"shortenUrl": "true"})

    assert response.status_code == 200, response.text
    assert short_link_pattern(migrated).fullmatch(response.text), response.text


def test_each_request_makes_a_different_short_link(
    client: TestClient[Litestar], demo: Demo, migrated: Settings
) -> None:
    first = get_link(client, {"shortenUrl": True})
    second = get_link(client, {"shortenUrl": True})

    assert short_code(migrated, first.text) != short_code(migrated, second.text)


def test_following_the_short_link_redirects_302_to_the_full_link(
    client: TestClient[Litestar], demo: Demo, migrated: Settings
) -> None:
    code = short_code(migrated, get_link(client, {"shortenUrl": True}).text)

    response = follow(client, code)

    assert response.status_code == 302
    assert response.headers["location"] == CAMPAIGN_LINK


def test_following_a_short_link_with_additional_params_redirects_to_them(
    client: TestClient[Litestar], demo: Demo, migrated: Settings
) -> None:
    code = short_code(
        migrated,
        get_link(client, {"shortenUrl": True, "additionalParams": "var1=value1"}).text,
    )

    response = follow(client, code)

    assert response.status_code == 302
    assert response.headers["location"] == f"{CAMPAIGN_LINK}&var1=value1"


def test_a_short_link_is_stored_for_the_account_without_a_call(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    code = short_code(migrated, get_link(client, {"shortenUrl": True}).text)

    [link] = stored_short_links(db)
    assert link.code == code
    assert link.account_id == demo.account_id
    assert link.target_url == CAMPAIGN_LINK
    assert link.token_id is None
    assert link.clicks == 0
    assert link.expires_at > utcnow()


def test_each_follow_of_the_short_link_counts_a_click(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    code = short_code(migrated, get_link(client, {"shortenUrl": True}).text)

    follow(client, code)
    follow(client, code)

    [link] = stored_short_links(db)
    assert link.clicks == 2
    assert link.first_clicked_at is not None
    assert link.last_clicked_at is not None
    assert link.first_clicked_at <= link.last_clicked_at


def test_an_unknown_short_code_is_404_link_not_found(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = follow(client, "Zz9Zz9Zz")

    assert_refused(response, 404, "Link not found")


@pytest.mark.parametrize(
    "code",
    ["a" * 40, "%C3%A9t%C3%A9", "abc%00def"],
    ids=["longer-than-any-code", "not-alphanumeric", "nul-byte"],
)
def test_a_code_that_no_short_link_can_have_is_404_link_not_found(
    client: TestClient[Litestar], demo: Demo, code: str
) -> None:
    response = follow(client, code)

    assert_refused(response, 404, "Link not found")


def test_an_expired_short_link_is_404_link_not_found(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    code = short_code(migrated, get_link(client, {"shortenUrl": True}).text)
    with db.transaction() as session:
        session.execute(
            update(ShortLink)
            .where(ShortLink.code == code)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )

    response = follow(client, code)

    assert_refused(response, 404, "Link not found")
    [link] = stored_short_links(db)
    assert link.clicks == 0


@pytest.mark.parametrize("value", [5, "yes", ["true"]], ids=["number", "word", "list"])
def test_shorten_url_that_is_not_a_boolean_is_400(
    client: TestClient[Litestar], demo: Demo, db: Database, value: object
) -> None:
    response = get_link(client, {"shortenUrl": value})

    assert_refused(response, 400, "missing or invalid parameter shortenUrl")
    assert stored_short_links(db) == []


# Refusals


def test_additional_params_that_are_not_a_query_string_are_400(
    client: TestClient[Litestar], demo: Demo
) -> None:
    response = get_link(client, {"additionalParams": "novalue"})

    assert_refused(response, 400, "missing or invalid parameter additionalParams")


def test_malformed_json_body_is_400_naming_body(client: TestClient[Litestar], demo: Demo) -> None:
    response = client.post(
        f"{V2}/campaign/url/campaign1",
        headers={**headers(), "Content-Type": "application/json"},
        content=b'{"shortenUrl": ',
    )

    assert_refused(response, 400, "missing or invalid parameter body")


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
    response = get_link(client, {"shortenUrl": True}, request_headers=request_headers)

    assert response.status_code == 401
    assert response.headers.get("Unauthenticated-Reason")
    assert json.loads(response.text) == UNAUTHORIZED_BODY
    assert stored_short_links(db) == []


def test_credentials_are_checked_before_the_body(client: TestClient[Litestar], demo: Demo) -> None:
    response = get_link(client, {"shortenUrl": 5}, request_headers={"Tenant-Id": TENANT})

    assert response.status_code == 401
    assert json.loads(response.text) == UNAUTHORIZED_BODY


def test_unknown_campaign_is_404(client: TestClient[Litestar], demo: Demo) -> None:
    response = get_link(client, campaign="nosuch")

    assert_refused(response, 404, "Campaign nosuch was not found")


def test_campaign_id_with_a_nul_byte_is_404(client: TestClient[Litestar], demo: Demo) -> None:
    response = get_link(client, campaign="campaign1%00")

    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("text/plain")


def test_campaign_only_in_dev_is_404_without_environment_name(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, "dev-only", environment="DEV", link_url="https://dev.example.com/flow")

    response = get_link(client, campaign="dev-only")

    assert_refused(response, 404, "Campaign dev-only was not found")


def test_campaign_only_in_dev_answers_its_link_with_environment_name_dev(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, "dev-only", environment="DEV", link_url="https://dev.example.com/flow")

    response = get_link(
        client, campaign="dev-only", request_headers=headers(**{"Environment-Name": "DEV"})
    )

    assert (response.status_code, response.text) == (200, "https://dev.example.com/flow")


def test_inactive_campaign_is_403(client: TestClient[Litestar], demo: Demo, db: Database) -> None:
    put_campaign(db, active=False)

    response = get_link(client, {"shortenUrl": True})

    assert_refused(response, 403, "Token expired")
    assert stored_short_links(db) == []


def test_campaign_past_its_valid_until_is_403(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, valid_until=utcnow() - timedelta(minutes=1))

    response = get_link(client)

    assert_refused(response, 403, "Token expired")


def test_campaign_without_a_link_is_400_naming_campaign_id(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, link_url=None)

    response = get_link(client)

    assert_refused(response, 400, "missing or invalid parameter campaignId")
