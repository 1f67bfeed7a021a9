"""One contract, every provider: the Twilio and Vonage adapters through their official SDKs,
and the simulator adapter, all against the simulator server; webhooks through the API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import func, select

from shared.accounts import provisioning
from shared.core.db import Database
from shared.core.models import DeliveryEvent, OptOut, utcnow
from shared.core.settings import Settings
from shared.messages.optout import add_opt_out
from shared.providers.interface import (
    InDoubtProviderError,
    PermanentProviderError,
    Provider,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    SendsAsync,
    TransientProviderError,
)
from shared.providers.registry import provider_factory
from tests.support.data import CALLER_E164, SENDER, TENANT, Demo
from tests.support.messages import accept_message, load_message
from tests.support.processes import wait_until
from tests.support.providers import (
    PROVIDERS,
    SENT_WORD,
    TWILIO_SID,
    TWILIO_TOKEN,
    VONAGE_KEY,
    Webhook,
    credentials,
    register_vonage,
    status_webhook,
    use_providers,
)
from tests.support.services import free_port
from worker import tasks

# The adapters that can also send on an event loop (SendsAsync), as a worker's send loop
# runs them; Vonage's SDK is blocking only (`test_the_adapters_that_send_on_an_event_loop`).
ASYNC_PROVIDERS = ["simulator", "twilio"]
WAYS = [(provider, "blocking") for provider in PROVIDERS] + [
    (provider, "on an event loop") for provider in ASYNC_PROVIDERS
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs for each provider; one that sends, each way that provider can send."""
    if "way" in metafunc.fixturenames:
        metafunc.parametrize(("provider", "way"), WAYS)
    else:
        metafunc.parametrize("provider", PROVIDERS)


def test_the_adapters_that_send_on_an_event_loop(provider: str, adapter: Provider) -> None:
    assert isinstance(adapter, SendsAsync) == (provider in ASYNC_PROVIDERS)


@pytest.fixture(autouse=True)
def trust_simulator(migrated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the worker does at start-up (SMSD_PROVIDER_CA_FILE): the Vonage SDK speaks only HTTPS.
    assert migrated.provider_ca_file is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(migrated.provider_ca_file))


@pytest.fixture
def adapter(provider: str, migrated: Settings, simulator: httpx.Client) -> Iterator[Provider]:
    quick = migrated.model_copy(update={"provider_timeout": timedelta(seconds=1)})
    if provider == "vonage":  # so the simulator checks every request's `sig`
        register_vonage(migrated, credentials(provider, migrated))
    built = provider_factory(provider)(credentials(provider, migrated), quick)
    yield built
    built.close()


Send = Callable[[SendRequest], SendResult]


@pytest.fixture
def send(way: str, adapter: Provider) -> Iterator[Send]:
    """The adapter's `send`, or its `send_async` as a worker's send loop runs it: both ways
    must classify every answer alike."""
    if way == "blocking":
        yield adapter.send
        return
    assert isinstance(adapter, SendsAsync)
    loop = asyncio.new_event_loop()
    yield lambda send_request: loop.run_until_complete(adapter.send_async(send_request))
    adapter.close()
    loop.close()


def request_for(settings: Settings, provider: str) -> SendRequest:
    sid = "SM" + uuid.uuid4().hex
    return SendRequest(
        idempotency_key=sid,
        to=CALLER_E164,
        sender=SENDER,
        body="Please click here https://flows.example.com/start",
        status_callback_url=f"{settings.public_base_url}/callbacks/{provider}?messageSid={sid}",
        validity_seconds=3600,
    )


def handset(simulator: httpx.Client, provider: str) -> list[dict[str, object]]:
    messages: list[dict[str, object]] = simulator.get(
        "/messages", params={"provider": provider}
    ).json()
    return messages


# Sending: each answer class of the provider becomes the right outcome.


def test_a_send_reaches_the_handset_and_returns_the_provider_id(
    provider: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    result = send(request_for(migrated, provider))
    [received] = handset(simulator, provider)
    assert (received["id"], received["to"]) == (result.provider_message_id, CALLER_E164)


@pytest.mark.parametrize(
    "answer",
    [
        "throttled",
        "unavailable",  # the provider's own 503: not processed
        "http_503",
        "sender_queue_full",  # Twilio 21611
        "queue_overflow",  # Twilio 30001
        "too_many_binds",  # Vonage status 10
    ],
)
def test_throttling_and_refusals_are_transient(
    provider: str, answer: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    simulator.post("/control", json={"next_errors": [answer], "timeout_ms": 2500})
    with pytest.raises(TransientProviderError):
        send(request_for(migrated, provider))
    assert handset(simulator, provider) == []


@pytest.mark.parametrize("answer", ["timeout", "http_500", "http_502", "http_504"])
def test_gateway_errors_and_timeouts_are_in_doubt(
    provider: str, answer: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    # A 500, or a gateway's 502/504, may come after the provider took the message.
    simulator.post("/control", json={"next_errors": [answer], "timeout_ms": 50})
    with pytest.raises(InDoubtProviderError):
        send(request_for(migrated, provider))


@pytest.mark.parametrize("answer", ["drop_connection", "reset_after_accept"])
def test_a_connection_dropped_after_the_request_is_never_posted_again(
    provider: str, answer: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    # The provider took the message and the answer was lost: an SDK that re-POSTs on
    # RemoteDisconnected (Vonage's does, by default) would reach the handset twice.
    simulator.post("/control", json={"next_errors": [answer]})
    with pytest.raises(InDoubtProviderError):
        send(request_for(migrated, provider))
    stats = simulator.get("/stats").json()
    assert stats["by_provider"][provider]["requests"] == 1
    assert len(handset(simulator, provider)) == 1


def test_a_refused_connection_is_transient_and_nothing_is_sent(
    provider: str, way: str, migrated: Settings, simulator: httpx.Client
) -> None:
    """Nothing listens where the provider should be: the request was never written."""
    nowhere = f"127.0.0.1:{free_port()}"
    # Vonage's SDK takes a host (it speaks only HTTPS); the others a base URL.
    moved = {
        **credentials(provider, migrated),
        **({"rest_host": nowhere} if provider == "vonage" else {"base_url": f"http://{nowhere}"}),
    }
    quick = migrated.model_copy(update={"provider_timeout": timedelta(seconds=1)})
    elsewhere = provider_factory(provider)(moved, quick)
    if way == "blocking":
        send: Send = elsewhere.send
    else:
        assert isinstance(elsewhere, SendsAsync)
        send = partial(_run_alone, elsewhere)
    try:
        with pytest.raises(TransientProviderError):
            send(request_for(migrated, provider))
    finally:
        elsewhere.close()
    assert handset(simulator, provider) == []


def _run_alone(adapter: SendsAsync, send_request: SendRequest) -> SendResult:
    return asyncio.run(adapter.send_async(send_request))


def test_an_invalid_number_is_permanent(
    provider: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    simulator.post("/control", json={"next_errors": ["invalid_number"]})
    with pytest.raises(PermanentProviderError) as refused:
        send(request_for(migrated, provider))
    assert not isinstance(refused.value, TransientProviderError)
    assert refused.value.code in ("21211", "3")


def test_a_recipient_the_provider_knows_opted_out_is_permanent(
    provider: str, send: Send, migrated: Settings, simulator: httpx.Client
) -> None:
    simulator.post("/control", json={"next_errors": ["opted_out"]})
    expected = RecipientOptedOut if provider in ("twilio", "simulator") else PermanentProviderError
    with pytest.raises(expected):
        send(request_for(migrated, provider))


# Webhooks: real callbacks from the simulator, and ones we sign (or forge) ourselves.


@pytest.fixture
def sent(
    provider: str, demo: Demo, db: Database, migrated: Settings, simulator: httpx.Client
) -> str:
    """A message sent through `provider` by the worker's own task, delivered via callbacks."""
    use_providers(db, migrated, [provider])
    sid = accept_message(db, migrated, utcnow())
    tasks.send_message(sid)
    return sid


def test_signed_callbacks_from_the_provider_deliver_the_message(
    provider: str, sent: str, api_url: str, db: Database
) -> None:
    wait_until(lambda: load_message(db, sent).status == "delivered", 20, "delivered")
    assert load_message(db, sent).provider_message_id is not None


def test_a_forged_callback_is_refused_and_changes_nothing(
    provider: str,
    demo: Demo,
    client: TestClient[Litestar],
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
) -> None:
    simulator.post("/control", json={"callbacks": False})  # only the forged report arrives
    use_providers(db, migrated, [provider])
    sent = accept_message(db, migrated, utcnow())
    try:
        tasks.send_message(sent)
    finally:  # DELETE /messages keeps `callbacks`: later tests in the session need them
        simulator.post("/control", json={"callbacks": True})
    before = _events(db, sent)
    hook = status_webhook(provider, migrated, sent, "whatever", "delivered", forged=True)
    response = _post(client, hook)
    assert response.status_code == 403
    # Counted for this message and this report only: the simulator may still be calling
    # back about earlier tests' messages (stored unmatched meanwhile).
    assert (load_message(db, sent).status, _events(db, sent)) == ("sent", before)


def test_an_out_of_order_callback_never_moves_a_final_status_back(
    provider: str, sent: str, client: TestClient[Litestar], db: Database, migrated: Settings
) -> None:
    provider_id = load_message(db, sent).provider_message_id
    assert provider_id is not None
    for status in ("delivered", SENT_WORD[provider]):
        hook = status_webhook(provider, migrated, sent, provider_id, status, forged=False)
        assert _post(client, hook).status_code == 204
    assert load_message(db, sent).status == "delivered"


# Opt-out: a recipient who texted STOP gets nothing more, and no provider call is made.


def test_an_opted_out_recipient_is_never_sent_to(
    provider: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    api_url: str,
    simulator: httpx.Client,
) -> None:
    use_providers(db, migrated, [provider])
    _text_stop(provider, simulator, migrated, db)
    sid = accept_message(db, migrated, utcnow())
    tasks.send_message(sid)
    assert load_message(db, sid).status == "opted_out"
    assert simulator.get("/stats").json()["requests"] == 0


def _text_stop(provider: str, simulator: httpx.Client, settings: Settings, db: Database) -> None:
    if provider == "simulator":
        # The generic simulator API has no inbound messages: record the opt-out directly.
        with db.transaction() as session:
            owner = provisioning.get_account(session, TENANT).id
            add_opt_out(session, owner, SENDER, CALLER_E164, utcnow())
        return
    answer = simulator.post(
        "/control/inbound",
        json={
            "provider": provider,
            "url": f"{settings.public_base_url}/inbound/{provider}",
            "from": CALLER_E164,
            "to": SENDER,
            "text": "Stop please",
            "account": TWILIO_SID if provider == "twilio" else VONAGE_KEY,
            "auth_token": TWILIO_TOKEN,
        },
    )
    assert answer.status_code < 300, answer.text  # the webhook's own answer, relayed
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(OptOut)) == 1


def _events(db: Database, sid: str) -> int:
    """The events stored about message `sid`, or about the provider id the tests' forged
    webhooks carry."""
    about = (DeliveryEvent.message_sid == sid) | (DeliveryEvent.provider_message_id == "whatever")
    with db.transaction() as session:
        return int(session.scalar(select(func.count()).where(about)) or 0)


def _post(client: TestClient[Litestar], hook: Webhook) -> httpx.Response:
    if hook.content is not None:
        return client.post(hook.path, content=hook.content, headers=hook.headers)
    return client.post(hook.path, data=hook.params, headers=hook.headers)
