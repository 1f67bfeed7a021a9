"""The deflection funnel end to end through real processes: token, send, delivery, click.

The API, the Celery worker and the provider simulator run as their own processes; the handset's
SMS (as the simulator received it) carries a short link that the API redirects and counts."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.settings import Settings
from tests.support.data import CALLER, CALLER_E164, TENANT, Demo, headers
from tests.support.processes import Process, wait_until

BASE = f"/interact/version/3/account/{TENANT}/resources"
CAMPAIGN_LINK = "https://flows.example.com/start?lang=en"


@pytest.fixture
def api(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=10)


def shorten_campaign_links(db: Database) -> None:
    """campaign1 of the demo account, as the fixture made it, with `shorten_links` on."""
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        environment = access.resolve_environment(session, account, None)
        provisioning.upsert_campaign(
            session,
            environment,
            "campaign1",
            name="Deflection",
            message_text="Please click here <link>",
            link_url=CAMPAIGN_LINK,
            active=True,
            shorten_links=True,
            valid_from=None,
            valid_until=None,
        )


def report_rows(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get(f"{BASE}/reports/deflected-calls", headers=headers())
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def test_a_click_on_the_delivered_sms_short_link_reaches_the_report(
    api: httpx.Client,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    shorten_campaign_links(db)
    start_worker()

    # The IVR asks for a token for the call, then for the campaign SMS.
    issued = api.post(f"{BASE}/token", headers=headers(), json={"callerId": CALLER})
    assert issued.status_code == 200, issued.text
    token: str = issued.json()["jpToken"]
    sent = api.post(
        f"{BASE}/campaign/sms/campaign1",
        headers=headers(Accept="application/json"),
        json={"callerId": CALLER, "jpToken": token},
    )
    assert sent.status_code == 200, sent.text
    sid: str = sent.json()["messageSid"]

    def delivered() -> bool:
        view = api.get(f"{BASE}/messages/{sid}", headers=headers()).json()
        return bool(view["status"] == "delivered")

    wait_until(delivered, 30, "the message to be delivered")

    # The handset got the SMS with a short link on the public base URL.
    [handset] = simulator.get("/messages").json()
    assert handset["to"] == CALLER_E164
    base = re.escape(migrated.public_base_url.rstrip("/"))
    match = re.fullmatch(rf"Please click here ({base}/l/[A-Za-z0-9]{{8}})", handset["body"])
    assert match is not None, handset["body"]

    # The caller taps it: a redirect to the full link that ties the click to the call.
    click = httpx.get(match.group(1), follow_redirects=False, timeout=10)
    assert click.status_code == 302
    assert click.headers["location"] == f"{CAMPAIGN_LINK}&startedFromSmsToken={token}"

    [row] = report_rows(api)
    assert row["jpToken"] == token
    assert row["callerId"] == CALLER_E164
    assert row["tokenIssuedAt"] is not None
    assert row["campaignId"] == "campaign1"
    assert row["smsSent"] is True
    assert row["smsSentBy"] == "service"
    assert row["messageSid"] == sid
    assert row["smsDeliveredAt"] is not None
    assert row["linkClicks"] == 1
    assert row["linkFirstClickedAt"] is not None
