"""How long a send may be: each rendered SMS is measured (GSM-7 or UCS-2, in segments) and one
longer than its campaign's `max_segments` is refused with a 400 naming what made it long.

`additionalParams` when the caller sent any (they lengthen the link and are the caller's to
shorten); `campaignId` otherwise (the campaign's own text is over its own limit). A refusal
leaves no message, no task and no short link; the message row and its lookup carry the
segments and encoding of what was accepted."""

from __future__ import annotations

import httpx
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select, update

from shared.core.db import Database
from shared.core.models import Campaign, ShortLink
from shared.text.segments import measure
from tests.api.test_soap import INVALID_PARAMETER_ENVELOPE, assert_envelope, post_soap, soap_request
from tests.support.api import (
    CAMPAIGN_TEXT,
    V3,
    assert_nothing_placed,
    issue_token,
    put_campaign,
    send_sms,
    stored_messages,
)
from tests.support.data import CALLER, Demo, headers

# "https://flows.example.com/start?lang=en&p=<value>&startedFromSmsToken=<7 characters>":
# 70 characters around the value of one `p` parameter; 88 with the demo campaign's text.
LINK_AROUND_P = 70
AROUND_P = len(CAMPAIGN_TEXT) - len("<link>") + LINK_AROUND_P
DEFAULT_LIMIT = 3 * 153  # septets in the default max_segments of 3 concatenated GSM-7 parts
POLISH_TEXT = "Proszę kliknąć tutaj: <link>"  # "ę" and "ą" are not in GSM-7


def long_params(body_length: int) -> str:
    """`additionalParams` that make the demo campaign's body exactly `body_length` long."""
    return "p=" + "x" * (body_length - AROUND_P)


def send(
    client: TestClient[Litestar], token: str, params: str | None, **extra: str
) -> httpx.Response:
    body = {"callerId": CALLER, "jpToken": token}
    if params is not None:
        body["additionalParams"] = params
    return send_sms(client, body, request_headers=headers(Accept="application/json", **extra))


def assert_refused(response: httpx.Response, parameter: str) -> None:
    assert (response.status_code, response.text) == (
        400,
        f"missing or invalid parameter {parameter}",
    )


def set_max_segments(db: Database, max_segments: int, campaign_id: str = "campaign1") -> None:
    with db.transaction() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.campaign_id == campaign_id)
            .values(max_segments=max_segments)
        )


def short_links(db: Database) -> list[ShortLink]:
    with db.transaction() as session:
        return list(session.scalars(select(ShortLink)))


def looked_up(client: TestClient[Litestar], sid: str) -> dict[str, object]:
    response = client.get(f"{V3}/messages/{sid}", headers=headers())
    assert response.status_code == 200, response.text
    view: dict[str, object] = response.json()
    return view


# Too long because of the caller's additionalParams


def test_additional_params_past_the_campaigns_segments_are_400_and_record_nothing(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)

    response = send(client, token, long_params(DEFAULT_LIMIT + 1))

    assert_refused(response, "additionalParams")
    assert_nothing_placed(db, redis_url)


def test_a_body_of_exactly_the_campaigns_segments_is_accepted(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)

    response = send(client, token, long_params(DEFAULT_LIMIT))

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert len(message.body) == DEFAULT_LIMIT
    assert (message.segments, message.encoding) == (3, "gsm7")


def test_a_tilde_in_additional_params_counts_two_septets_and_is_never_split(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    # `~` is the one extension character a query string carries unencoded. The 60 characters
    # before the value put the first part boundary between the two septets of a `~`.
    fits = "p=" + "~" * 184  # 456 septets in 272 characters
    # 458 septets (under 3 x 153), but two parts each end one septet short rather than split
    # a `~`, and what is left no longer fits the third part.
    too_long = "p=" + "~" * 185

    assert_refused(send(client, issue_token(client), too_long), "additionalParams")
    assert_nothing_placed(db, redis_url)
    response = send(client, issue_token(client), fits)

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert len(message.body) == AROUND_P + 184
    assert measure(message.body).units == AROUND_P + 2 * 184
    assert (message.segments, message.encoding) == (3, "gsm7")


def test_raising_max_segments_lets_the_same_send_through_with_its_segments(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    token = issue_token(client)
    params = long_params(DEFAULT_LIMIT + 1)
    assert_refused(send(client, token, params), "additionalParams")

    set_max_segments(db, 4)
    response = send(client, token, params)

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert message.sid == response.json()["messageSid"]
    assert len(message.body) == DEFAULT_LIMIT + 1
    assert (message.segments, message.encoding) == (4, "gsm7")
    view = looked_up(client, message.sid)
    assert (view["segments"], view["encoding"]) == (4, "gsm7")


def test_refused_with_an_idempotency_key_records_nothing_and_the_key_stays_free(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    token = issue_token(client)
    params = long_params(DEFAULT_LIMIT + 1)

    assert_refused(send(client, token, params, **{"Idempotency-Key": "k1"}), "additionalParams")
    assert_nothing_placed(db, redis_url)

    set_max_segments(db, 4)
    response = send(client, token, params, **{"Idempotency-Key": "k1"})
    assert response.status_code == 200, response.text
    assert [m.segments for m in stored_messages(db)] == [4]


# Too long on its own


def test_a_campaign_whose_own_text_is_past_its_segments_is_400_campaign_id(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, message_text="x" * DEFAULT_LIMIT + " <link>")

    response = send(client, issue_token(client), None)

    assert_refused(response, "campaignId")
    assert_nothing_placed(db, redis_url)


def test_a_campaign_without_a_link_past_its_segments_is_400_campaign_id(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, message_text="€" * 230, link_url=None)  # 460 septets in 230 characters

    assert_refused(send(client, issue_token(client), None), "campaignId")
    assert_nothing_placed(db, redis_url)
    set_max_segments(db, 4)
    response = send(client, issue_token(client), None)

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert (message.segments, message.encoding) == (4, "gsm7")


def test_a_refused_send_with_a_shortened_link_leaves_no_short_link(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, message_text="x" * DEFAULT_LIMIT + " <link>")
    with db.transaction() as session:
        session.execute(update(Campaign).values(shorten_links=True))

    assert_refused(send(client, issue_token(client), None), "campaignId")
    assert_nothing_placed(db, redis_url)
    assert short_links(db) == []


# UCS-2


def test_a_campaign_with_a_non_gsm_character_is_measured_in_ucs2(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    put_campaign(db, message_text=POLISH_TEXT)

    response = send(client, issue_token(client), None)

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    # 89 UTF-16 units: two 67-unit parts, where as GSM-7 it would have fit one SMS.
    assert len(message.body) == 89
    assert (message.segments, message.encoding) == (2, "ucs2")
    view = looked_up(client, message.sid)
    assert (view["segments"], view["encoding"]) == (2, "ucs2")


def test_ucs2_additional_params_past_the_segments_are_400_until_the_limit_is_raised(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, message_text=POLISH_TEXT)
    token = issue_token(client)
    around = len(POLISH_TEXT) - len("<link>") + LINK_AROUND_P
    params = "p=" + "x" * (3 * 67 + 1 - around)  # 202 units: four UCS-2 parts
    # Only 202 characters: as GSM-7 this would still be two segments.
    assert measure("x" * 202).segments == 2

    assert_refused(send(client, token, params), "additionalParams")
    assert_nothing_placed(db, redis_url)

    set_max_segments(db, 4)
    response = send(client, token, params)

    assert response.status_code == 200, response.text
    [message] = stored_messages(db)
    assert len(message.body) == 202
    assert (message.segments, message.encoding) == (4, "ucs2")
    view = looked_up(client, message.sid)
    assert (view["segments"], view["encoding"]) == (4, "ucs2")


# SOAP goes through the same accept path


def test_soap_additional_params_past_the_segments_answer_the_invalid_parameter_envelope(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    envelope = soap_request(
        additional_params=long_params(DEFAULT_LIMIT + 1), jp_token=issue_token(client)
    )

    response = post_soap(client, envelope)

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter="additionalParams"))
    assert_nothing_placed(db, redis_url)


def test_soap_campaign_past_its_segments_answers_the_invalid_parameter_envelope(
    client: TestClient[Litestar], demo: Demo, db: Database, redis_url: str
) -> None:
    put_campaign(db, message_text="x" * DEFAULT_LIMIT + " <link>")
    envelope = soap_request(additional_params=None, jp_token=issue_token(client))

    response = post_soap(client, envelope)

    assert_envelope(response, 200, INVALID_PARAMETER_ENVELOPE.format(parameter="campaignId"))
    assert_nothing_placed(db, redis_url)
