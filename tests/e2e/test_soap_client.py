"""A SOAP client nobody here wrote (zeep) against the real API process: it loads the served
WSDL without complaint, sends campaign1, and the message is then delivered by a real worker."""

from __future__ import annotations

import gc
import re
import warnings
from collections.abc import Callable, Iterator

import httpx
import pytest
import requests
import zeep

from tests.support.data import CALLER, CALLER_E164, TENANT, Demo, headers
from tests.support.processes import Process, wait_until

WSDL_PATH = "/interact/version/2/agent/soap/agent.wsdl"
V3 = f"/interact/version/3/account/{TENANT}/resources"
SENT = re.compile(r"message: Campaign campaign1 was sent to queue messageSid: (SM[0-9a-f]{32})")


@pytest.fixture
def authenticated_session(demo: Demo) -> Iterator[requests.Session]:
    """What zeep sends with: the seed's Tenant-Id and Application-Key on every request."""
    with requests.Session() as session:
        session.headers.update(headers())
        yield session


def load_client(
    api_url: str, session: requests.Session
) -> tuple[zeep.Client, list[warnings.WarningMessage]]:
    """zeep's client for the served WSDL, and every warning loading it emitted."""
    # Garbage an earlier test left (a socket it never closed) is collected first: its
    # ResourceWarning would otherwise land in whichever test the collector next runs in.
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # zeep's constructors carry no annotations.
        transport = zeep.Transport(session=session)  # type: ignore[no-untyped-call]
        client = zeep.Client(api_url + WSDL_PATH, transport=transport)  # type: ignore[no-untyped-call]
    return client, list(caught)


def test_zeep_loads_the_served_wsdl_without_warnings(
    api_url: str, authenticated_session: requests.Session
) -> None:
    _client, caught = load_client(api_url, authenticated_session)

    assert [str(w.message) for w in caught] == []


def test_zeep_sends_campaign1_and_the_message_is_delivered(
    api_url: str,
    authenticated_session: requests.Session,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    client, _caught = load_client(api_url, authenticated_session)

    answer = client.service.CampaignSMS(campaignId="campaign1", callerId=CALLER)

    assert isinstance(answer, str), answer
    match = SENT.fullmatch(answer)
    assert match is not None, answer
    sid = match.group(1)

    start_worker()
    with httpx.Client(base_url=api_url, timeout=10) as api:

        def delivered() -> bool:
            view = api.get(f"{V3}/messages/{sid}", headers=headers()).json()
            return bool(view["status"] == "delivered")

        wait_until(delivered, 30, "the SOAP-sent message to be delivered")
    handsets = [m for m in simulator.get("/messages").json() if m["idempotencyKey"] == sid]
    assert [m["to"] for m in handsets] == [CALLER_E164]


def test_zeep_send_with_a_jp_token_marks_the_call_sms_sent_once_delivered(
    api_url: str,
    authenticated_session: requests.Session,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    client, _caught = load_client(api_url, authenticated_session)
    with httpx.Client(base_url=api_url, timeout=10) as api:
        issued = api.post(f"{V3}/token", headers=headers(), json={"callerId": CALLER})
        assert issued.status_code == 200, issued.text
        token: str = issued.json()["jpToken"]

        answer = client.service.CampaignSMS(campaignId="campaign1", callerId=CALLER, jpToken=token)
        match = SENT.fullmatch(answer)
        assert match is not None, answer
        start_worker()

        def reported() -> list[tuple[str, bool, str | None, bool]]:
            rows = api.get(f"{V3}/reports/deflected-calls", headers=headers()).json()
            return [
                (r["jpToken"], r["smsSent"], r["messageSid"], r["smsDeliveredAt"] is not None)
                for r in rows
            ]

        expected = [(token, True, match.group(1), True)]
        wait_until(lambda: reported() == expected, 30, "the call to be reported delivered")


def test_zeep_raises_the_unauthorized_fault_for_a_wrong_application_key(
    api_url: str, authenticated_session: requests.Session
) -> None:
    client, _caught = load_client(api_url, authenticated_session)
    authenticated_session.headers["Application-Key"] = "ffffffffffffffffffffffff"

    with pytest.raises(zeep.exceptions.Fault) as fault:
        client.service.CampaignSMS(campaignId="campaign1", callerId=CALLER)

    assert (fault.value.code, fault.value.message) == (
        "0x7000000",
        "Request is unauthorized, missing or wrong credentials",
    )
