"""Faults a send can meet, through each adapter and its real SDK against the simulator: each
maps to transient (provably not taken), in doubt (maybe taken) or permanent; and the ways a
send in doubt is resolved: Twilio's message list, status lookups, idempotent replays."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from twilio.rest import Client  # type: ignore[import-untyped, unused-ignore]

from shared.providers.interface import (
    InDoubtProviderError,
    Provider,
    SendRequest,
    TransientProviderError,
)
from shared.providers.simulator import IDEMPOTENCY_HEADER, SimulatorProvider, new_credentials
from shared.providers.twilio import TwilioProvider
from shared.providers.vonage import VonageProvider
from tests.simulator.support import Receiver, Sim

ACCOUNT_SID = "AC" + "9" * 32
AUTH_TOKEN = secrets.token_hex(16)
API_KEY = "f" + secrets.token_hex(4)
API_SECRET = secrets.token_hex(8)
TO = "+15558675310"
FROM = "+15017122661"
PROVIDERS = ["twilio", "vonage", "simulator"]
# Short client timeouts keep these fast; Vonage's SDK takes whole seconds only (so 1 s).
CLIENT_TIMEOUT = timedelta(seconds=0.5)


def script(sim: Sim, **behaviour: Any) -> dict[str, Any]:
    response = sim.control.post("/control", json=behaviour)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def request(receiver: Receiver, provider: str, body: str | None = None) -> SendRequest:
    sid = "SM" + secrets.token_hex(16)
    return SendRequest(
        idempotency_key=sid,
        to=TO,
        sender=FROM,
        body=body or f"hi {sid}",
        status_callback_url=receiver.url(f"/callbacks/{provider}?messageSid={sid}"),
        validity_seconds=600,
    )


def build(sim: Sim, provider: str, *, port: int | None = None) -> Provider:
    """`provider`'s adapter pointed at the simulator (or at `port` on localhost instead)."""
    settings = sim.settings.model_copy(update={"provider_timeout": CLIENT_TIMEOUT})
    http = f"http://127.0.0.1:{port}" if port else sim.url
    if provider == "twilio":
        credentials = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "base_url": http}
        return TwilioProvider(credentials, settings)
    if provider == "vonage":
        host = f"127.0.0.1:{port}" if port else sim.tls_host
        vonage = {"api_key": API_KEY, "api_secret": API_SECRET, "rest_host": host}
        return VonageProvider(vonage, settings)
    return SimulatorProvider({"base_url": http, **new_credentials()}, settings)


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def adapter(sim: Sim, provider: str) -> Iterator[Provider]:
    built = build(sim, provider)
    yield built
    built.close()


def handsets(sim: Sim, provider: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = sim.control.get(
        "/messages", params={"provider": provider}
    ).json()
    return messages


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there now: connections are refused


def wait_for(check: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# Classification: every fault class, every adapter, through the real SDK.


def test_a_refused_connection_is_transient(sim: Sim, receiver: Receiver, provider: str) -> None:
    adapter = build(sim, provider, port=closed_port())
    with pytest.raises(TransientProviderError):
        adapter.send(request(receiver, provider))
    adapter.close()


@pytest.mark.parametrize(
    ("fault", "expected", "taken"),
    [
        ("slow_answer", InDoubtProviderError, True),
        ("reset_after_accept", InDoubtProviderError, True),
        ("drop_connection", InDoubtProviderError, True),
        ("blackhole", InDoubtProviderError, False),
        ("http_500", InDoubtProviderError, False),
        ("http_502", InDoubtProviderError, False),
        ("http_504", InDoubtProviderError, False),
        ("timeout", InDoubtProviderError, False),  # a gateway's 504 after a long wait
        ("throttled", TransientProviderError, False),
        ("unavailable", TransientProviderError, False),
        ("http_503", TransientProviderError, False),
    ],
)
def test_one_shot_faults_are_classified(
    sim: Sim,
    receiver: Receiver,
    provider: str,
    adapter: Provider,
    fault: str,
    expected: type[Exception],
    taken: bool,
) -> None:
    script(sim, next_errors_by_provider={provider: [fault]}, slow_answer_ms=2000, timeout_ms=50)
    with pytest.raises(expected) as failed:
        adapter.send(request(receiver, provider))
    assert type(failed.value) is expected
    assert len(handsets(sim, provider)) == (1 if taken else 0)
    assert sim.control.get("/stats").json()["by_provider"][provider]["requests"] == 1


def test_server_error_in_each_providers_words(
    sim: Sim, receiver: Receiver, provider: str, adapter: Provider
) -> None:
    # Twilio's 500 and Vonage's status 5 may have been taken; the simulator's 503 was not.
    script(sim, next_errors=["server_error"])
    expected = TransientProviderError if provider == "simulator" else InDoubtProviderError
    with pytest.raises(expected):
        adapter.send(request(receiver, provider))


def test_a_persistent_fault_holds_until_cleared_and_only_for_its_provider(
    sim: Sim, receiver: Receiver
) -> None:
    twilio, generic = build(sim, "twilio"), build(sim, "simulator")
    assert script(sim, faults={"twilio": "blackhole"})["faults"] == {"twilio": "blackhole"}
    for _ in range(2):
        with pytest.raises(InDoubtProviderError):
            twilio.send(request(receiver, "twilio"))
    generic.send(request(receiver, "simulator"))  # other providers are unaffected
    assert handsets(sim, "twilio") == []

    script(sim, faults={"twilio": "outage"})  # replaces twilio's fault
    with pytest.raises(TransientProviderError):
        twilio.send(request(receiver, "twilio"))

    assert script(sim, faults={"twilio": None})["faults"] == {}  # healed
    twilio.send(request(receiver, "twilio"))
    assert len(handsets(sim, "twilio")) == 1
    twilio.close()
    generic.close()


def test_control_refuses_unknown_faults_and_providers(sim: Sim) -> None:
    for body in (
        {"faults": {"twilio": "meteor"}},
        {"faults": {"acme": "blackhole"}},
        {"next_errors_by_provider": {"vonage": ["nope"]}},
        {"callbacks_by_provider": {"acme": False}},
    ):
        assert sim.control.post("/control", json=body).status_code == 400, body
    script(sim, faults={"vonage": "slow_answer", "twilio": "outage"})
    assert script(sim, faults={})["faults"] == {}
    script(sim, faults={"vonage": "slow_answer"})
    assert sim.control.delete("/messages").status_code == 204
    assert sim.control.get("/control").json()["faults"] == {}


# Twilio: a send in doubt is looked up in the account's message list.


def test_twilio_finds_a_message_it_took_while_the_answer_was_lost(
    sim: Sim, receiver: Receiver
) -> None:
    twilio = build(sim, "twilio")
    began = datetime.now(UTC)
    script(sim, faults={"twilio": "slow_answer"}, slow_answer_ms=2000)
    sent = request(receiver, "twilio")
    with pytest.raises(InDoubtProviderError):
        twilio.send(sent)
    script(sim, faults={})
    other = request(receiver, "twilio")  # same recipient and sender, another text
    twilio.send(other)
    [taken] = [m for m in handsets(sim, "twilio") if m["body"] == sent.body]

    found = twilio.find(sent, began)
    assert found is not None
    assert found.provider_message_id == taken["id"]
    wait_for(lambda: twilio.status_of(taken["id"]) == "delivered")
    twilio.close()


def test_twilio_finds_nothing_for_a_send_it_never_got(sim: Sim, receiver: Receiver) -> None:
    twilio = build(sim, "twilio")
    began = datetime.now(UTC)
    twilio.send(request(receiver, "twilio", body="an earlier text"))
    script(sim, faults={"twilio": "blackhole"})
    lost = request(receiver, "twilio")
    with pytest.raises(InDoubtProviderError):
        twilio.send(lost)
    assert twilio.find(lost, began) is None
    # The same text sent long before the send in doubt is not taken for it.
    script(sim, faults={})
    earlier = request(receiver, "twilio", body="an earlier text")
    assert twilio.find(earlier, datetime.now(UTC) + timedelta(minutes=5)) is None
    twilio.close()


def test_twilio_lookups_that_fail_are_transient(sim: Sim, receiver: Receiver) -> None:
    twilio = build(sim, "twilio", port=closed_port())
    with pytest.raises(TransientProviderError):
        twilio.find(request(receiver, "twilio"), datetime.now(UTC))
    with pytest.raises(TransientProviderError):
        twilio.status_of("SM" + "0" * 32)
    twilio.close()


def test_twilio_list_pages_and_filters_as_the_sdk_reads_them(sim: Sim) -> None:
    twilio = build(sim, "twilio")
    for index in range(5):
        twilio.send(SendRequest(f"k{index}", TO, FROM, f"page {index}", "", validity_seconds=600))
    client = Client(ACCOUNT_SID, AUTH_TOKEN)  # the SDK's own paging, not the adapter's
    client.api.base_url = sim.url
    listed = client.messages.list(to=TO, from_=FROM, page_size=2)
    assert [m.body for m in listed] == [f"page {index}" for index in reversed(range(5))]
    assert client.messages.list(to="+15550000000") == []
    wait_for(lambda: all(m["status"] == "delivered" for m in handsets(sim, "twilio")))
    today = datetime.now(UTC)
    assert len(client.messages.list(date_sent_after=today - timedelta(days=1))) == 5
    assert client.messages.list(date_sent_after=today + timedelta(days=1)) == []
    assert len(client.messages.list(date_sent=today)) == 5
    twilio.close()


# Vonage cannot be asked; the simulator can, and deduplicates.


def test_vonage_cannot_be_asked(sim: Sim, receiver: Receiver) -> None:
    vonage = build(sim, "vonage")
    assert vonage.searchable is False
    assert vonage.status_of("0A0000000123ABCD1") is None
    with pytest.raises(NotImplementedError):
        vonage.find(request(receiver, "vonage"), datetime.now(UTC))


def test_the_simulator_resends_a_send_in_doubt_once(sim: Sim, receiver: Receiver) -> None:
    generic = build(sim, "simulator")
    sent = request(receiver, "simulator")
    script(sim, next_errors_by_provider={"simulator": ["reset_after_accept"]})
    with pytest.raises(InDoubtProviderError):
        generic.send(sent)
    again = generic.send(sent)  # the same Idempotency-Key: a replay
    [message] = handsets(sim, "simulator")
    assert again.provider_message_id == message["id"]
    wait_for(lambda: generic.status_of(message["id"]) == "delivered")
    generic.close()


def test_a_concurrent_duplicate_makes_one_message(sim: Sim) -> None:
    # The first copy is held (latency) while the second arrives: both get the one message.
    script(sim, latency_ms=300)
    key = "SM" + secrets.token_hex(16)
    answers: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=sim.url, timeout=5) as client:
            body = {"to": TO, "from": FROM, "body": "once"}
            answers.append(client.post("/messages", json=body, headers={IDEMPOTENCY_HEADER: key}))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(handsets(sim, "simulator")) == 1
    assert sorted(answer.status_code for answer in answers) == [200, 200, 201]
    assert len({answer.json()["id"] for answer in answers}) == 1


def test_a_duplicate_during_a_slow_answer_is_a_replay(sim: Sim, receiver: Receiver) -> None:
    generic = build(sim, "simulator")
    sent = request(receiver, "simulator")
    script(sim, faults={"simulator": "slow_answer"}, slow_answer_ms=1500)
    with pytest.raises(InDoubtProviderError):
        generic.send(sent)
    # The first answer is still held back; the retry is answered at once, as a replay.
    replay = generic.send(sent)
    assert [m["id"] for m in handsets(sim, "simulator")] == [replay.provider_message_id]
    generic.close()


# Receipts off: messages still reach their handsets, and only a lookup tells.


def test_receipts_can_be_turned_off_for_one_provider(sim: Sim, receiver: Receiver) -> None:
    script(sim, callbacks_by_provider={"simulator": False})
    generic, twilio = build(sim, "simulator"), build(sim, "twilio")
    silent = generic.send(request(receiver, "simulator"))
    twilio.send(request(receiver, "twilio"))
    hook = receiver.next()
    assert hook.path.startswith("/callbacks/twilio")  # Twilio's receipts still come
    wait_for(lambda: generic.status_of(silent.provider_message_id) == "delivered")
    time.sleep(0.1)
    assert all(h.path.startswith("/callbacks/twilio") for h in list(receiver.hooks.queue))
    generic.close()
    twilio.close()


def test_receipts_off_for_all_still_deliver(sim: Sim, receiver: Receiver) -> None:
    script(sim, callbacks=False)
    try:
        twilio = build(sim, "twilio")
        sent = twilio.send(request(receiver, "twilio"))
        wait_for(lambda: twilio.status_of(sent.provider_message_id) == "delivered")
        assert receiver.hooks.empty()
        twilio.close()
    finally:
        script(sim, callbacks=True)
