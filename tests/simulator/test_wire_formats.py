"""The simulator speaks Twilio's and Vonage's wire formats: driven here through the official
SDKs, unchanged, over HTTP and HTTPS, with their callbacks checked by the SDKs' validators."""

from __future__ import annotations

import re
import secrets
import ssl
from typing import Any

import httpx
import pytest
from twilio.base.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    TwilioRestException,
)
from twilio.request_validator import (  # type: ignore[import-untyped, unused-ignore]
    RequestValidator,
)
from twilio.rest import Client  # type: ignore[import-untyped, unused-ignore]
from vonage import Auth, HttpClientOptions, Vonage  # type: ignore[import-untyped, unused-ignore]
from vonage_http_client.errors import (  # type: ignore[import-untyped, unused-ignore]
    HttpRequestError,
)
from vonage_sms import SmsError, SmsMessage  # type: ignore[import-untyped, unused-ignore]

from shared.providers.interface import SendRequest
from shared.providers.simulator import (
    SimulatorProvider,
    new_credentials,
    verify_signature,
)
from tests.simulator.support import Receiver, Sim

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
API_KEY = "a1b2c3d4"
API_SECRET = "vonage-api-secret"
SIGNING_SECRET = secrets.token_hex(16)  # the Vonage account's signature secret
TO = "+15558675310"
FROM = "+15017122661"


def twilio(base_url: str, account_sid: str = ACCOUNT_SID) -> Any:
    client = Client(account_sid, AUTH_TOKEN)
    client.api.base_url = base_url
    return client


def vonage(sim: Sim, **auth: str) -> Any:
    credentials = auth or {"api_key": API_KEY, "api_secret": API_SECRET}
    return Vonage(Auth(**credentials), HttpClientOptions(rest_host=sim.tls_host))


def vonage_send(sim: Sim, **fields: Any) -> Any:
    message = {"to": TO.removeprefix("+"), "from_": "ACME", "text": "Hello from Vonage", **fields}
    return vonage(sim).sms.send(SmsMessage(**message))


def register_vonage(sim: Sim, **account: str | bool) -> None:
    """Tell the simulator the Vonage account's secrets, so it checks and signs for it."""
    body = {"api_key": API_KEY, "signature_secret": SIGNING_SECRET, "signature_method": "sha256"}
    response = sim.control.post("/control/vonage/accounts", json={**body, **account})
    assert response.status_code == 200, response.text


def script(sim: Sim, **behaviour: Any) -> dict[str, Any]:
    response = sim.control.post("/control", json=behaviour)
    assert response.status_code == 200, response.text
    control: dict[str, Any] = response.json()
    return control


def handsets(sim: Sim, provider: str | None = None) -> list[dict[str, Any]]:
    params = {"provider": provider} if provider else {}
    messages: list[dict[str, Any]] = sim.control.get("/messages", params=params).json()
    return messages


# Twilio


def test_twilio_send_returns_a_message_instance(sim: Sim) -> None:
    message = twilio(sim.url).messages.create(to=TO, from_=FROM, body="Hello from Twilio")

    assert re.fullmatch(r"SM[0-9a-f]{32}", message.sid)
    assert message.status == "queued"
    assert message.account_sid == ACCOUNT_SID
    assert (message.to, message.from_, message.body) == (TO, FROM, "Hello from Twilio")
    assert message.num_segments == "1"
    assert message.direction == "outbound-api"
    assert message.api_version == "2010-04-01"
    assert message.date_created is not None
    assert message.error_code is None
    assert message.price is None
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"
    [handset] = handsets(sim, "twilio")
    assert handset["id"] == message.sid
    assert handset["account"] == ACCOUNT_SID
    assert (handset["to"], handset["from"], handset["body"]) == (TO, FROM, "Hello from Twilio")


def test_twilio_over_https_and_fetch(sim: Sim) -> None:
    client = twilio(sim.tls_url)
    long_body = "x" * 161
    created = client.messages.create(to=TO, from_=FROM, body=long_body, validity_period=600)
    fetched = client.messages(created.sid).fetch()

    assert fetched.sid == created.sid
    assert fetched.num_segments == "2"
    assert handsets(sim, "twilio")[0]["validityPeriod"] == 600


def test_twilio_refuses_requests_without_credentials(sim: Sim) -> None:
    response = httpx.post(
        f"{sim.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        data={"To": TO, "From": FROM, "Body": "hi"},
    )
    assert response.status_code == 401
    assert response.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    # Credentials of one account on another account's URL.
    with pytest.raises(TwilioRestException) as refused:
        twilio(sim.url).api.v2010.accounts("AC" + "f" * 32).messages.create(
            to=TO, from_=FROM, body="hi"
        )
    assert (refused.value.status, refused.value.code) == (401, 20003)
    assert handsets(sim) == []


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"to": "not-a-number"}, 21211),
        ({"validity_period": 36_001}, 21624),
        ({"body": ""}, 21602),
    ],
)
def test_twilio_validates_parameters(sim: Sim, fields: dict[str, Any], code: int) -> None:
    with pytest.raises(TwilioRestException) as refused:
        twilio(sim.url).messages.create(**{"to": TO, "from_": FROM, "body": "hi", **fields})
    assert (refused.value.status, refused.value.code) == (400, code)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("throttled", 429, 20429),
        ("server_error", 500, 20500),
        ("invalid_number", 400, 21211),
        ("opted_out", 400, 21610),
        ("timeout", 504, 504),  # a gateway's text answer: the SDK reports the HTTP status
    ],
)
def test_twilio_scripted_errors(sim: Sim, error: str, status: int, code: int) -> None:
    script(sim, next_errors=[error], timeout_ms=50)
    client = twilio(sim.url)
    with pytest.raises(TwilioRestException) as refused:
        client.messages.create(to=TO, from_=FROM, body="hi")
    assert (refused.value.status, refused.value.code) == (status, code)
    assert handsets(sim) == []
    # The script is used up: the next send goes through.
    assert client.messages.create(to=TO, from_=FROM, body="hi").status == "queued"


@pytest.mark.parametrize("final_status", ["delivered", "undelivered", "failed"])
def test_twilio_status_callbacks_are_signed_as_twilio_signs(
    sim: Sim, receiver: Receiver, final_status: str
) -> None:
    script(sim, final_status=final_status)
    url = receiver.url("/callbacks/twilio?tenant=12345678")
    message = twilio(sim.url).messages.create(to=TO, from_=FROM, body="hi", status_callback=url)

    hooks = [receiver.next(), receiver.next()]
    validator = RequestValidator(AUTH_TOKEN)
    for hook in hooks:
        assert hook.path == "/callbacks/twilio?tenant=12345678"
        assert hook.headers["content-type"] == "application/x-www-form-urlencoded"
        assert validator.validate(url, hook.params, hook.headers["x-twilio-signature"])
        assert not RequestValidator("another-token").validate(
            url, hook.params, hook.headers["x-twilio-signature"]
        )
    sent, final = (hook.params for hook in hooks)
    assert sent == {
        "ApiVersion": "2010-04-01",
        "AccountSid": ACCOUNT_SID,
        "MessageSid": message.sid,
        "SmsSid": message.sid,
        "From": FROM,
        "To": TO,
        "MessageStatus": "sent",
        "SmsStatus": "sent",
    }
    assert final["MessageStatus"] == final["SmsStatus"] == final_status
    assert final.get("ErrorCode") == {"undelivered": "30003", "failed": "30008"}.get(final_status)
    assert twilio(sim.url).messages(message.sid).fetch().status == final_status


def test_callbacks_are_retried_on_server_errors(sim: Sim, receiver: Receiver) -> None:
    receiver.status = 503
    url = receiver.url("/callbacks/twilio")
    twilio(sim.url).messages.create(to=TO, from_=FROM, body="hi", status_callback=url)

    first, again = receiver.next(), receiver.next()
    receiver.status = 200
    assert first.params == again.params
    assert first.params["MessageStatus"] == "sent"


# Vonage


def test_vonage_send_over_https(sim: Sim) -> None:
    response = vonage_send(sim, client_ref="msg-1")

    assert response.message_count == "1"
    [sent] = response.messages
    assert sent.status == "0"
    assert re.fullmatch(r"[0-9A-F]{16}", sent.message_id)
    assert sent.client_ref == "msg-1"
    assert sent.to == TO.removeprefix("+")
    assert (sent.remaining_balance, sent.message_price, sent.network) == (
        "10.00",
        "0.0333",
        "12345",
    )
    [handset] = handsets(sim, "vonage")
    assert handset["id"] == sent.message_id
    assert handset["account"] == API_KEY
    assert handset["clientRef"] == "msg-1"
    assert (handset["to"], handset["from"], handset["body"]) == (TO, "ACME", "Hello from Vonage")


def test_vonage_signed_requests_are_accepted(sim: Sim) -> None:
    client = vonage(
        sim, api_key=API_KEY, signature_secret="request-signing-secret", signature_method="sha256"
    )
    response = client.sms.send(SmsMessage(to=TO.removeprefix("+"), from_="ACME", text="hi"))
    assert response.messages[0].status == "0"


@pytest.mark.parametrize(
    ("form", "status"),
    [
        ({"api_key": API_KEY}, "4"),  # no secret, no signature
        ({}, "2"),  # no api_key at all
    ],
)
def test_vonage_refuses_bad_credentials(sim: Sim, form: dict[str, str], status: str) -> None:
    response = httpx.post(
        f"{sim.tls_url}/sms/json",
        data={**form, "from": "ACME", "to": "15558675310", "text": "hi"},
        verify=ssl.create_default_context(cafile=sim.ca_bundle),
    )
    assert response.status_code == 200
    assert response.json()["messages"][0]["status"] == status
    assert handsets(sim) == []


@pytest.mark.parametrize(
    ("error", "status"),
    [("throttled", "1"), ("server_error", "5"), ("invalid_number", "3"), ("opted_out", "3")],
)
def test_vonage_scripted_errors(sim: Sim, error: str, status: str) -> None:
    script(sim, next_errors=[error])
    with pytest.raises(SmsError, match=f"failed with error code {status}:"):
        vonage_send(sim)
    assert handsets(sim) == []
    assert vonage_send(sim).messages[0].status == "0"


def test_vonage_throttling_reads_as_vonage_words_it(sim: Sim) -> None:
    script(sim, next_errors=["throttled"])
    with pytest.raises(
        SmsError, match=re.escape("Throughput Rate Exceeded - please wait [ 1000 ]")
    ):
        vonage_send(sim)


def test_vonage_timeout_is_a_gateway_timeout(sim: Sim) -> None:
    script(sim, next_errors=["timeout"], timeout_ms=50)
    with pytest.raises(HttpRequestError) as refused:
        vonage_send(sim)
    assert refused.value.response.status_code == 504
    assert handsets(sim) == []


@pytest.mark.parametrize(
    ("final_status", "err_code"),
    [("delivered", "0"), ("failed", "8"), ("expired", "2"), ("rejected", "6")],
)
def test_vonage_delivery_receipts_are_signed_as_vonage_signs(
    sim: Sim, receiver: Receiver, final_status: str, err_code: str
) -> None:
    script(sim, final_status=final_status)
    register_vonage(sim, api_secret=API_SECRET, require_signature=False)
    url = receiver.url("/callbacks/vonage")
    sent = vonage_send(sim, client_ref="msg-2", callback=url).messages[0]

    hook = receiver.next()
    params = hook.params
    signer = Auth(api_key=API_KEY, signature_secret=SIGNING_SECRET, signature_method="sha256")
    assert signer.check_signature(dict(params))
    assert not Auth(
        api_key=API_KEY, signature_secret="wrong", signature_method="sha256"
    ).check_signature(dict(params))
    assert params["messageId"] == sent.message_id
    assert params["msisdn"] == TO.removeprefix("+")
    assert params["to"] == "ACME"
    assert params["status"] == final_status
    assert params["err-code"] == err_code
    assert params["client-ref"] == "msg-2"
    assert params["api-key"] == API_KEY
    assert params["network-code"] == "12345"
    assert re.fullmatch(r"\d{10}", params["scts"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", params["message-timestamp"])
    assert params["timestamp"].isdigit()
    assert re.fullmatch(r"[0-9a-f-]{36}", params["nonce"])
    assert handsets(sim, "vonage")[0]["status"] == final_status


# The generic API, and what all three share


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("throttled", 429, "20429"),
        ("server_error", 503, "20503"),
        ("invalid_number", 400, "21211"),
        ("opted_out", 400, "21610"),
        ("timeout", 504, None),
    ],
)
def test_generic_scripted_errors(sim: Sim, error: str, status: int, code: str | None) -> None:
    script(sim, next_errors=[error], timeout_ms=50)
    body = {"to": TO, "from": FROM, "body": "hi"}
    response = sim.control.post("/messages", json=body, headers={"Idempotency-Key": "k1"})
    assert response.status_code == status
    if code is not None:
        assert response.json()["code"] == code
    assert handsets(sim) == []
    # Nothing was recorded for the key: the retry is a first send.
    again = sim.control.post("/messages", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 201


def test_generic_adapter_still_works(sim: Sim, receiver: Receiver) -> None:
    account = new_credentials()
    provider = SimulatorProvider({"base_url": sim.url, **account}, sim.settings)
    request = SendRequest(
        idempotency_key="SM-generic-1",
        to=TO,
        sender=FROM,
        body="hi",
        status_callback_url=receiver.url("/callbacks/simulator"),
        validity_seconds=600,
    )
    try:
        first = provider.send(request)
        replay = provider.send(request)
    finally:
        provider.close()
    assert first.provider_message_id == replay.provider_message_id
    assert first.provider_message_id.startswith("SIM")
    assert set(first.raw) == {"id", "to", "from", "body", "status", "idempotencyKey"}
    hook = receiver.next()
    assert verify_signature(
        account["signing_secret"],
        hook.headers["x-simulator-timestamp"],
        receiver.url("/callbacks/simulator"),
        hook.body,
        hook.headers["x-simulator-signature"],
    )
    stats = sim.control.get("/stats").json()
    assert (stats["messages"], stats["replays"]) == (1, 1)


def test_scripted_errors_are_taken_one_per_send_across_apis(sim: Sim) -> None:
    script(sim, next_errors=["throttled", "opted_out"])
    with pytest.raises(TwilioRestException) as throttled:
        twilio(sim.url).messages.create(to=TO, from_=FROM, body="hi")
    assert throttled.value.code == 20429
    assert sim.control.get("/control").json()["next_errors"] == ["opted_out"]
    with pytest.raises(SmsError, match="error code 3"):
        vonage_send(sim)
    assert sim.control.get("/control").json()["next_errors"] == []
    assert vonage_send(sim).messages[0].status == "0"


def test_outage_fails_one_provider_until_lifted(sim: Sim) -> None:
    assert script(sim, outage=["twilio"])["outage"] == ["twilio"]
    client = twilio(sim.url)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as refused:
            client.messages.create(to=TO, from_=FROM, body="hi")
        # Twilio's own "not processed": the sender may try again or fail over.
        assert (refused.value.status, refused.value.code) == (503, 20503)
    assert vonage_send(sim).messages[0].status == "0"  # the failover target still works

    script(sim, outage=["vonage", "simulator"])
    with pytest.raises(HttpRequestError) as unavailable:
        vonage_send(sim)
    assert unavailable.value.response.status_code == 503
    generic = sim.control.post("/messages", json={"to": TO, "from": FROM, "body": "hi"})
    assert generic.status_code == 503
    assert client.messages.create(to=TO, from_=FROM, body="hi").status == "queued"

    assert sim.control.delete("/messages").status_code == 204
    assert sim.control.get("/control").json()["outage"] == []


def test_control_refuses_unknown_scripts(sim: Sim) -> None:
    assert sim.control.post("/control", json={"next_errors": ["nope"]}).status_code == 400
    assert sim.control.post("/control", json={"outage": ["acme"]}).status_code == 400
    control = sim.control.get("/control").json()
    assert control["next_errors"] == control["outage"] == []
    assert control["timeout_ms"] == 100


def test_stats_and_messages_across_providers(sim: Sim) -> None:
    client = twilio(sim.url)
    # Twilio and Vonage do not deduplicate: the same send twice reaches the handset twice.
    for _ in range(2):
        client.messages.create(to=TO, from_=FROM, body="same")
        vonage_send(sim, client_ref="same")
    for _ in range(2):
        sim.control.post(
            "/messages",
            json={"to": TO, "from": FROM, "body": "same"},
            headers={"Idempotency-Key": "same"},
        )

    stats = sim.control.get("/stats").json()
    # Earlier tests' callbacks may still be retrying: their count is not this test's.
    assert set(stats.pop("callbacks")) == {"posted", "dropped"}
    assert stats == {
        "requests": 6,
        "messages": 5,
        "replays": 1,
        "by_provider": {
            "twilio": {"requests": 2, "messages": 2},
            "vonage": {"requests": 2, "messages": 2},
            "simulator": {"requests": 2, "messages": 1},
        },
    }
    messages = handsets(sim)
    assert [m["provider"] for m in messages] == ["twilio", "vonage"] * 2 + ["simulator"]
    for message in messages:
        assert {"id", "provider", "to", "from", "body", "status", "account"} <= set(message)
        assert {"idempotencyKey", "clientRef"} <= set(message)
    [generic] = handsets(sim, "simulator")
    assert generic["idempotencyKey"] == "same"
    assert generic["account"] is None

    assert sim.control.delete("/messages").status_code == 204
    assert sim.control.get("/stats").json()["requests"] == 0
    assert handsets(sim) == []


# Inbound messages


def test_inbound_twilio_sms_is_signed_as_twilio_signs(sim: Sim, receiver: Receiver) -> None:
    url = receiver.url("/inbound/twilio?x=1")
    response = sim.control.post(
        "/control/inbound",
        json={
            "provider": "twilio",
            "url": url,
            "from": TO,
            "to": FROM,
            "text": "STOP",
            "account": ACCOUNT_SID,
            "auth_token": AUTH_TOKEN,
        },
    )
    assert response.status_code == 200

    hook = receiver.next()
    assert RequestValidator(AUTH_TOKEN).validate(
        url, hook.params, hook.headers["x-twilio-signature"]
    )
    params = hook.params
    assert re.fullmatch(r"SM[0-9a-f]{32}", params["MessageSid"])
    assert params["SmsSid"] == params["MessageSid"]
    assert {
        k: params[k] for k in ("AccountSid", "From", "To", "Body", "NumMedia", "NumSegments")
    } == {
        "AccountSid": ACCOUNT_SID,
        "From": TO,
        "To": FROM,
        "Body": "STOP",
        "NumMedia": "0",
        "NumSegments": "1",
    }
    assert params["ApiVersion"] == "2010-04-01"


def test_inbound_vonage_sms_is_signed_as_vonage_signs(sim: Sim, receiver: Receiver) -> None:
    register_vonage(sim)
    url = receiver.url("/inbound/vonage")
    body = {"provider": "vonage", "url": url, "from": TO, "to": FROM, "text": "stop please"}
    response = sim.control.post("/control/inbound", json={**body, "account": API_KEY})
    assert response.status_code == 200

    params = receiver.next().params
    signer = Auth(api_key=API_KEY, signature_secret=SIGNING_SECRET, signature_method="sha256")
    assert signer.check_signature(dict(params))
    assert params["msisdn"] == TO.removeprefix("+")
    assert params["to"] == FROM.removeprefix("+")
    assert (params["text"], params["type"], params["keyword"]) == ("stop please", "text", "STOP")
    assert params["api-key"] == API_KEY
    assert re.fullmatch(r"[0-9A-F]{16}", params["messageId"])
    assert {"message-timestamp", "timestamp", "nonce", "sig"} <= set(params)


def test_inbound_answers_with_the_webhooks_status(sim: Sim, receiver: Receiver) -> None:
    receiver.status = 403
    body = {
        "provider": "twilio",
        "url": receiver.url("/inbound/twilio"),
        "from": TO,
        "to": FROM,
        "account": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
    }
    response = sim.control.post("/control/inbound", json=body)
    assert response.status_code == 403
    assert response.json()["sent"]["Body"] == "STOP"
    assert (
        sim.control.post("/control/inbound", json={**body, "auth_token": None}).status_code == 400
    )
