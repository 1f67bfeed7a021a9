"""Short links in SMS texts: a campaign with `shorten_links` sends `<public base URL>/l/<code>`.

Following it redirects (302) to the full link with the call's `startedFromSmsToken`, and every
click is counted on the link and on the call's row of the Deflected Call Report."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import httpx
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select, update

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.models import DeflectedCall, InteractionToken, ShortLink, utcnow
from shared.core.settings import Settings
from tests.support.api import (
    CAMPAIGN_LINK,
    CAMPAIGN_TEXT,
    V3,
    assert_nothing_placed,
    issue_token,
    send_sms,
    stored_deflected_calls,
    stored_messages,
)
from tests.support.data import CALLER, TENANT, Demo, headers

REPORT = f"{V3}/reports/deflected-calls"
V2 = f"/interact/version/2/account/{TENANT}/resources"


def shorten_campaign_links(db: Database, campaign_id: str = "campaign1") -> None:
    """Turn `shorten_links` on for a campaign of the demo account, keeping its other fields."""
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        environment = access.resolve_environment(session, account, None)
        campaign = access.find_campaign(session, environment, campaign_id)
        assert campaign is not None
        provisioning.upsert_campaign(
            session,
            environment,
            campaign_id,
            name=campaign.name,
            message_text=campaign.message_text,
            link_url=campaign.link_url,
            active=campaign.active,
            shorten_links=True,
            valid_from=campaign.valid_from,
            valid_until=campaign.valid_until,
        )


def short_body_pattern(settings: Settings) -> re.Pattern[str]:
    """The campaign text with `<link>` replaced by a short link."""
    base = re.escape(settings.public_base_url.rstrip("/"))
    text = re.escape(CAMPAIGN_TEXT).replace(re.escape("<link>"), rf"{base}/l/([A-Za-z0-9]{{8}})")
    return re.compile(rf"^{text}$")


def code_in_body(settings: Settings, body: str) -> str:
    match = short_body_pattern(settings).fullmatch(body)
    assert match is not None, body
    return match.group(1)


def sent_with_short_link(
    client: TestClient[Litestar], db: Database, settings: Settings, token: str, **extra: str
) -> str:
    """Send campaign1 to the call of `token`; the short code in the message body."""
    response = send_sms(client, {"callerId": CALLER, "jpToken": token, **extra})
    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    return code_in_body(settings, message.body)


def follow(client: TestClient[Litestar], code: str) -> httpx.Response:
    return client.get(f"/l/{code}", follow_redirects=False)


def the_link(db: Database, code: str) -> ShortLink:
    with db.transaction() as session:
        link = session.get(ShortLink, code)
        assert link is not None, code
        return link


def token_id(db: Database, token: str) -> int:
    with db.transaction() as session:
        found = session.scalar(select(InteractionToken.id).where(InteractionToken.token == token))
        assert found is not None, token
        return found


def the_call(db: Database, token: str) -> DeflectedCall:
    """The call's row of the Deflected Call Report, as the database holds it."""
    wanted = token_id(db, token)
    [call] = [c for c in stored_deflected_calls(db) if c.token_id == wanted]
    return call


# The message body


def test_the_message_body_carries_a_short_link_on_the_public_base_url(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)

    response = send_sms(client, {"callerId": CALLER, "jpToken": token})

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert short_body_pattern(migrated).fullmatch(message.body), message.body
    assert CAMPAIGN_LINK not in message.body
    assert token not in message.body


def test_without_shorten_links_the_body_carries_the_full_link(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    send_sms(client, {"callerId": CALLER, "jpToken": token})

    [message] = stored_messages(db)
    assert message.body == f"Please click here {CAMPAIGN_LINK}&startedFromSmsToken={token}"
    with db.transaction() as session:
        assert list(session.scalars(select(ShortLink))) == []


def test_the_short_link_is_stored_for_the_account_and_the_call(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)

    code = sent_with_short_link(client, db, migrated, token)

    link = the_link(db, code)
    assert link.account_id == demo.account_id
    assert link.token_id == token_id(db, token)
    assert link.target_url == f"{CAMPAIGN_LINK}&startedFromSmsToken={token}"
    assert link.clicks == 0
    assert link.expires_at > utcnow()


def test_each_send_gets_its_own_short_link(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)

    send_sms(client, {"callerId": CALLER, "jpToken": token})
    send_sms(client, {"callerId": CALLER, "jpToken": token})

    codes = {code_in_body(migrated, message.body) for message in stored_messages(db)}
    assert len(codes) == 2


def test_an_idempotent_replay_makes_no_second_short_link(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    keyed = headers(**{"Idempotency-Key": "call-42"})

    send_sms(client, {"callerId": CALLER, "jpToken": token}, request_headers=keyed)
    replay = send_sms(client, {"callerId": CALLER, "jpToken": token}, request_headers=keyed)

    assert replay.headers["Idempotency-Replay"] == "true"
    [message] = stored_messages(db)
    with db.transaction() as session:
        assert list(session.scalars(select(ShortLink.code))) == [
            code_in_body(migrated, message.body)
        ]


def test_a_refused_send_leaves_no_short_link(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)

    response = send_sms(client, {"from": "+12025550143", "callerId": CALLER, "jpToken": token})

    assert response.status_code == 400
    assert_nothing_placed(db, redis_url)
    with db.transaction() as session:
        assert list(session.scalars(select(ShortLink))) == []


# Following the link


def test_following_the_short_link_redirects_302_to_the_full_link_with_the_token(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token)

    response = follow(client, code)

    assert response.status_code == 302
    assert response.headers["location"] == f"{CAMPAIGN_LINK}&startedFromSmsToken={token}"


def test_the_redirect_keeps_the_additional_params_before_the_token(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token, additionalParams="var1=value1")

    response = follow(client, code)

    assert response.status_code == 302
    assert response.headers["location"] == (
        f"{CAMPAIGN_LINK}&var1=value1&startedFromSmsToken={token}"
    )


def test_each_follow_increments_the_short_links_clicks(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    code = sent_with_short_link(client, db, migrated, issue_token(client))

    follow(client, code)
    follow(client, code)
    follow(client, code)

    assert the_link(db, code).clicks == 3


def test_a_click_counts_on_the_calls_row(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token)
    before = utcnow()

    follow(client, code)

    call = the_call(db, token)
    assert call.link_clicks == 1
    assert call.link_first_clicked_at is not None
    assert before <= call.link_first_clicked_at <= utcnow()


def test_later_clicks_add_up_and_keep_the_first_click_time(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token)
    follow(client, code)
    first_clicked_at = the_call(db, token).link_first_clicked_at

    follow(client, code)
    follow(client, code)

    call = the_call(db, token)
    assert call.link_clicks == 3
    assert first_clicked_at is not None
    assert call.link_first_clicked_at == first_clicked_at


def test_a_call_with_no_click_has_none_on_its_row(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    sent_with_short_link(client, db, migrated, token)

    call = the_call(db, token)
    assert (call.link_clicks, call.link_first_clicked_at) == (0, None)


def test_the_report_shows_link_clicks_and_the_first_click_time(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token)
    follow(client, code)
    follow(client, code)

    response = client.get(REPORT, headers=headers())

    assert response.status_code == 200, response.text
    [row] = response.json()
    assert row["jpToken"] == token
    assert row["linkClicks"] == 2
    first_clicked_at = the_call(db, token).link_first_clicked_at
    assert first_clicked_at is not None
    assert row["linkFirstClickedAt"] is not None
    assert datetime.fromisoformat(row["linkFirstClickedAt"].replace("Z", "+00:00")) == (
        first_clicked_at
    )


def test_the_report_shows_no_clicks_before_the_link_is_followed(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    sent_with_short_link(client, db, migrated, token)

    [row] = client.get(REPORT, headers=headers()).json()

    assert (row["linkClicks"], row["linkFirstClickedAt"]) == (0, None)


def test_an_expired_short_link_is_404_and_counts_no_click(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)
    code = sent_with_short_link(client, db, migrated, token)
    with db.transaction() as session:
        session.execute(
            update(ShortLink)
            .where(ShortLink.code == code)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )

    response = follow(client, code)

    assert (response.status_code, response.text) == (404, "Link not found")
    assert the_link(db, code).clicks == 0
    assert the_call(db, token).link_clicks == 0


def test_a_v2_send_shortens_to_the_link_without_a_token_and_counts_on_no_call(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    shorten_campaign_links(db)
    token = issue_token(client)  # a call exists, but v2 never ties a message to it

    response = client.post(
        f"{V2}/campaign/sms/campaign1",
        headers=headers(),
        json={"callerId": CALLER, "jpToken": token},
    )
    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    code = code_in_body(migrated, message.body)
    redirect = follow(client, code)

    assert redirect.status_code == 302
    assert redirect.headers["location"] == CAMPAIGN_LINK
    assert the_link(db, code).token_id is None
    assert the_link(db, code).clicks == 1
    assert the_call(db, token).link_clicks == 0
