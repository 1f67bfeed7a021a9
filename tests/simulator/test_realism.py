"""Provider realism: what real Twilio and Vonage accounts do that the happy path does not
(intermediate, repeated and out-of-order callbacks, error codes, RFC 9457 errors, multi-part
sends, every Vonage signing method, dropped connections), each through the adapters and
the official SDKs against the in-process simulator."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from twilio.base.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    TwilioServiceException,
)
from twilio.rest import Client  # type: ignore[import-untyped, unused-ignore]
from twilio.rest.api.v2010.account.message import (  # type: ignore[import-untyped, unused-ignore]
    MessageInstance,
)
from vonage import Auth, HttpClientOptions, Vonage  # type: ignore[import-untyped, unused-ignore]
from vonage_sms import SmsError, SmsMessage  # type: ignore[import-untyped, unused-ignore]

from shared.core.models import MessageStatus
from shared.providers.interface import (
    InDoubtProviderError,
    PermanentProviderError,
    Provider,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    TransientProviderError,
)
from shared.providers.simulator import SimulatorProvider, new_credentials, verify_signature
from shared.providers.twilio import OPT_OUT_ERROR_CODES, TWILIO_STATUSES, TwilioProvider
from shared.providers.vonage import VonageProvider, signature, verify_webhook
from tests.simulator.support import Hook, Receiver, Sim

ACCOUNT_SID = "AC" + "7" * 32
AUTH_TOKEN = secrets.token_hex(16)
API_KEY = "k" + secrets.token_hex(4)
API_SECRET = secrets.token_hex(8)
TO = "+15558675310"
FROM = "+15017122661"
LONG_TEXT = "Please click here: https://flows.example.com/start " * 4  # 204 GSM-7 characters
METHODS = ["md5hash", "md5", "sha1", "sha256", "sha512"]


def script(sim: Sim, **behaviour: Any) -> None:
    response = sim.control.post("/control", json=behaviour)
    assert response.status_code == 200, response.text


def register_vonage(sim: Sim, **account: Any) -> None:
    response = sim.control.post("/control/vonage/accounts", json={"api_key": API_KEY, **account})
    assert response.status_code == 200, response.text


def request(receiver: Receiver, provider: str, body: str = "hi") -> SendRequest:
    sid = "SM" + secrets.token_hex(16)
    return SendRequest(
        idempotency_key=sid,
        to=TO,
        sender=FROM,
        body=body,
        status_callback_url=receiver.url(f"/callbacks/{provider}?messageSid={sid}"),
        validity_seconds=600,
    )


def hooks(receiver: Receiver, count: int) -> list[Hook]:
    got = [receiver.next() for _ in range(count)]
    time.sleep(0.1)
    assert receiver.hooks.empty(), "no more callbacks than expected"
    return got


@pytest.fixture
def twilio(sim: Sim) -> Iterator[Provider]:
    credentials = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "base_url": sim.url}
    provider = TwilioProvider(credentials, sim.settings)
    yield provider
    provider.close()


def vonage_credentials(sim: Sim, **extra: str) -> dict[str, str]:
    return {"api_key": API_KEY, "api_secret": API_SECRET, "rest_host": sim.tls_host, **extra}


def vonage(sim: Sim, **extra: str) -> VonageProvider:
    return VonageProvider(vonage_credentials(sim, **extra), sim.settings)


def requests_of(sim: Sim, provider: str) -> int:
    count: int = sim.control.get("/stats").json()["by_provider"][provider]["requests"]
    return count


def handsets(sim: Sim, provider: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = sim.control.get(
        "/messages", params={"provider": provider}
    ).json()
    return messages


# The generic simulator API: each account's own secret signs its callbacks.


def test_generic_callbacks_are_signed_with_the_accounts_secret(
    sim: Sim, receiver: Receiver
) -> None:
    account = new_credentials()
    provider = SimulatorProvider({"base_url": sim.url, **account}, sim.settings)
    sent = request(receiver, "simulator")
    try:
        result = provider.send(sent)
    finally:
        provider.close()
    first, final = hooks(receiver, 2)
    for hook in (first, final):
        timestamp = hook.headers["x-simulator-timestamp"]
        assert abs(int(timestamp) - time.time()) < 30
        args = (timestamp, sent.status_callback_url, hook.body)
        assert verify_signature(
            account["signing_secret"], *args, hook.headers["x-simulator-signature"]
        )
        assert not verify_signature("another", *args, hook.headers["x-simulator-signature"])
        # The timestamp is signed: the same signature under another time does not pass.
        later = (str(int(timestamp) + 60), sent.status_callback_url, hook.body)
        assert not verify_signature(
            account["signing_secret"], *later, hook.headers["x-simulator-signature"]
        )
    assert json.loads(final.body) == {
        "id": result.provider_message_id,
        "status": "delivered",
        "to": TO,
        "accountId": account["account_id"],
    }
    [handset] = handsets(sim, "simulator")
    assert handset["account"] == account["account_id"]
    assert account["signing_secret"] not in json.dumps(handsets(sim, "simulator"))


def test_generic_sends_without_credentials_get_unsigned_callbacks(
    sim: Sim, receiver: Receiver
) -> None:
    provider = SimulatorProvider({"base_url": sim.url}, sim.settings)
    try:
        provider.send(request(receiver, "simulator"))
    finally:
        provider.close()
    for hook in hooks(receiver, 2):
        assert "x-simulator-signature" not in hook.headers
        assert json.loads(hook.body)["accountId"] is None


# Twilio: callbacks as real ones come.


def test_twilio_statuses_cover_the_sdks_status_enum() -> None:
    enum = {
        value
        for name, value in vars(MessageInstance.Status).items()
        if not name.startswith("_") and isinstance(value, str)
    }
    assert enum == set(TWILIO_STATUSES)
    assert TWILIO_STATUSES["partially_delivered"] is MessageStatus.SENT
    assert TWILIO_STATUSES["canceled"] is MessageStatus.FAILED
    assert TWILIO_STATUSES["receiving"] is TWILIO_STATUSES["received"] is MessageStatus.QUEUED
    assert {"21610"} == OPT_OUT_ERROR_CODES


def test_twilio_intermediate_statuses_come_in_order(
    sim: Sim, receiver: Receiver, twilio: Provider
) -> None:
    script(sim, callback_statuses=["queued", "sending", "sent", "delivered"], final_status="read")
    result = twilio.send(request(receiver, "twilio"))
    reported = [hook.params["MessageStatus"] for hook in hooks(receiver, 5)]
    assert reported == ["queued", "sending", "sent", "delivered", "read"]
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = sim.url
    assert client.messages(result.provider_message_id).fetch().status == "read"


def test_twilio_callbacks_out_of_order_leave_the_true_status(
    sim: Sim, receiver: Receiver, twilio: Provider
) -> None:
    script(sim, callback_statuses=["sending", "sent"], callback_order="reversed")
    twilio.send(request(receiver, "twilio"))
    reported = [hook.params["MessageStatus"] for hook in hooks(receiver, 3)]
    assert reported == ["delivered", "sent", "sending"]
    assert handsets(sim, "twilio")[0]["status"] == "delivered"


def test_twilio_repeated_callbacks_carry_the_same_idempotency_token(
    sim: Sim, receiver: Receiver, twilio: Provider
) -> None:
    script(sim, callback_repeats=2)
    twilio.send(request(receiver, "twilio"))
    sent, sent_again, final, final_again = hooks(receiver, 4)
    assert sent.body == sent_again.body
    assert final.body == final_again.body
    token = "i-twilio-idempotency-token"
    assert sent.headers[token] == sent_again.headers[token]
    assert final.headers[token] == final_again.headers[token]
    assert sent.headers[token] != final.headers[token]


def test_twilio_retries_a_callback_with_the_same_token(sim: Sim, receiver: Receiver) -> None:
    receiver.status = 503
    provider = TwilioProvider(
        {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "base_url": sim.url},
        sim.settings,
    )
    provider.send(request(receiver, "twilio"))
    first, again = receiver.next(), receiver.next()
    receiver.status = 200
    token = "i-twilio-idempotency-token"
    assert first.headers[token] == again.headers[token]


@pytest.mark.parametrize(
    ("final_status", "code"),
    [("undelivered", 30007), ("failed", 21610), ("undelivered", 21610)],
)
def test_twilio_final_statuses_carry_the_scripted_error_code(
    sim: Sim, receiver: Receiver, twilio: Provider, final_status: str, code: int
) -> None:
    script(sim, final_status=final_status, final_error_code=code)
    twilio.send(request(receiver, "twilio"))
    sent, final = hooks(receiver, 2)
    assert "ErrorCode" not in sent.params
    assert (final.params["MessageStatus"], final.params["ErrorCode"]) == (final_status, str(code))


def test_twilio_canceled_and_partially_delivered(
    sim: Sim, receiver: Receiver, twilio: Provider
) -> None:
    script(sim, callback_statuses=["partially_delivered"], final_status="canceled")
    twilio.send(request(receiver, "twilio"))
    reported = [hook.params["MessageStatus"] for hook in hooks(receiver, 2)]
    assert reported == ["partially_delivered", "canceled"]
    assert [TWILIO_STATUSES[status] for status in reported] == [
        MessageStatus.SENT,
        MessageStatus.FAILED,
    ]


@pytest.mark.parametrize("error_format", ["classic", "rfc9457"])
@pytest.mark.parametrize(
    ("answer", "expected", "code"),
    [
        ("opted_out", RecipientOptedOut, "21610"),
        ("invalid_number", PermanentProviderError, "21211"),
        ("throttled", TransientProviderError, "20429"),
        ("sender_queue_full", TransientProviderError, "21611"),
        ("queue_overflow", TransientProviderError, "30001"),
        ("server_error", InDoubtProviderError, "20500"),
        ("unavailable", TransientProviderError, "20503"),
    ],
)
def test_twilio_errors_are_classified_in_either_body_shape(
    sim: Sim,
    receiver: Receiver,
    twilio: Provider,
    error_format: str,
    answer: str,
    expected: type[ProviderError],
    code: str,
) -> None:
    script(sim, error_format=error_format, next_errors=[answer])
    with pytest.raises(expected) as refused:
        twilio.send(request(receiver, "twilio"))
    assert refused.value.code == code
    if expected is PermanentProviderError:
        assert not isinstance(refused.value, TransientProviderError | RecipientOptedOut)


def test_the_sdk_reads_rfc9457_errors_into_its_service_exception(sim: Sim) -> None:
    script(sim, error_format="rfc9457", next_errors=["opted_out"])
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = sim.url
    with pytest.raises(TwilioServiceException) as refused:
        client.messages.create(to=TO, from_=FROM, body="hi")
    assert (refused.value.status, refused.value.code) == (400, 21610)
    assert refused.value.instance.endswith("/Messages.json")


# Vonage: multi-part sends, one id and one receipt per part.


def test_vonage_splits_a_long_text_with_an_id_and_a_receipt_per_part(
    sim: Sim, receiver: Receiver
) -> None:
    sent = request(receiver, "vonage", LONG_TEXT)
    result = vonage(sim).send(sent)
    assert len(set(result.parts)) == len(result.parts) == 2
    assert result.provider_message_id == result.parts[0]
    assert result.unsent_parts == 0
    receipts = [hook.params for hook in hooks(receiver, 2)]
    assert {params["messageId"] for params in receipts} == set(result.parts)
    assert {params["client-ref"] for params in receipts} == {sent.idempotency_key}
    [handset] = handsets(sim, "vonage")
    assert (handset["id"], handset["parts"]) == (result.provider_message_id, list(result.parts))


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("é" * 70, 1),
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
    ],
)
def test_vonage_splits_as_vonage_does(sim: Sim, receiver: Receiver, text: str, parts: int) -> None:
    result = vonage(sim).send(request(receiver, "vonage", text))
    assert len(result.parts or (result.provider_message_id,)) == parts


def test_a_partial_failure_returns_what_went_out_and_is_not_an_error(
    sim: Sim, receiver: Receiver
) -> None:
    script(sim, next_errors=["partial_failure"])
    result = vonage(sim).send(request(receiver, "vonage", LONG_TEXT))
    assert (len(result.parts), result.unsent_parts) == (1, 1)
    assert result.provider_message_id == result.parts[0]
    [receipt] = hooks(receiver, 1)
    assert receipt.params["messageId"] == result.provider_message_id


@pytest.mark.parametrize("text", ["hi", LONG_TEXT])
def test_too_many_binds_is_transient_even_when_every_part_is_refused(
    sim: Sim, receiver: Receiver, text: str
) -> None:
    script(sim, next_errors=["too_many_binds"])
    with pytest.raises(TransientProviderError) as refused:
        vonage(sim).send(request(receiver, "vonage", text))
    assert refused.value.code == "10"
    assert handsets(sim, "vonage") == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("http_500", InDoubtProviderError),
        ("http_502", InDoubtProviderError),
        ("http_503", TransientProviderError),
        ("http_504", InDoubtProviderError),
    ],
)
def test_vonage_gateway_errors_are_classified(
    sim: Sim, receiver: Receiver, answer: str, expected: type[ProviderError]
) -> None:
    script(sim, next_errors=[answer])
    with pytest.raises(expected) as refused:
        vonage(sim).send(request(receiver, "vonage"))
    assert refused.value.code == answer.removeprefix("http_")


# Vonage signing: every method, both directions.


def reference_md5hash(params: dict[str, str], secret: str) -> str:
    """Vonage's documented "MD5 hash", written out here from the docs, not from our code."""
    text = ""
    for key in sorted(params):
        text += "&" + key + "=" + params[key].replace("&", "_").replace("=", "_")
    return hashlib.md5((text + secret).encode()).hexdigest()  # noqa: S324


SAMPLE = {
    "api-key": "abc",
    "messageId": "0A0000000123ABCD1",
    "msisdn": "447700900000",
    "status": "delivered",
    "text": "a=b&c",
    "timestamp": "1700000000",
}


def test_md5hash_matches_the_documented_algorithm() -> None:
    assert signature(SAMPLE, "s3cret", "md5hash") == reference_md5hash(SAMPLE, "s3cret")
    expected = hashlib.md5(  # noqa: S324
        b"&api-key=abc&messageId=0A0000000123ABCD1&msisdn=447700900000&status=delivered"
        b"&text=a_b_c&timestamp=1700000000s3cret"
    ).hexdigest()
    assert signature(SAMPLE, "s3cret", "md5hash") == expected


@pytest.mark.parametrize("method", ["md5", "sha1", "sha256", "sha512"])
def test_hmac_methods_are_the_sdks_signer(method: str) -> None:
    sdk = Auth(api_key="abc", signature_secret="s3cret", signature_method=method)
    assert signature(SAMPLE, "s3cret", method) == sdk.sign_params(dict(SAMPLE))
    canonical = "".join(
        f"&{key}={SAMPLE[key].replace('&', '_').replace('=', '_')}" for key in sorted(SAMPLE)
    )
    assert (
        signature(SAMPLE, "s3cret", method)
        == hmac.new(b"s3cret", canonical.encode(), getattr(hashlib, method)).hexdigest()
    )


@pytest.mark.parametrize("method", METHODS)
def test_verify_webhook_checks_each_method(method: str) -> None:
    credentials = {"api_key": "abc", "signature_secret": "s3cret", "signature_method": method}
    signed = {**SAMPLE, "sig": signature(SAMPLE, "s3cret", method)}
    assert verify_webhook(credentials, signed)
    assert verify_webhook(credentials, {**signed, "sig": signed["sig"].upper()})
    assert not verify_webhook(credentials, {**signed, "status": "failed"})
    assert not verify_webhook({**credentials, "signature_secret": "other"}, signed)
    assert not verify_webhook(credentials, SAMPLE)  # unsigned
    other = "md5hash" if method != "md5hash" else "md5"
    assert not verify_webhook({**credentials, "signature_method": other}, signed)


@pytest.mark.parametrize("method", ["", "sha3", "MD5HASH", "md5 hash"])
def test_verify_webhook_refuses_an_unknown_method_without_raising(method: str) -> None:
    credentials = {"api_key": "abc", "signature_secret": "s3cret", "signature_method": method}
    signed = {**SAMPLE, "sig": signature(SAMPLE, "s3cret", "sha256")}
    assert verify_webhook(credentials, signed) is (method == "")  # empty: the default, sha256


@pytest.mark.parametrize("method", METHODS)
def test_vonage_signed_sends_and_receipts_in_every_method(
    sim: Sim, receiver: Receiver, method: str
) -> None:
    secret = secrets.token_hex(16)
    credentials = vonage_credentials(sim, signature_secret=secret, signature_method=method)
    register_vonage(sim, signature_secret=secret, signature_method=method)
    # The simulator checks the request's sig in `method`: a wrong one is status 14.
    result = VonageProvider(credentials, sim.settings).send(request(receiver, "vonage"))
    [receipt] = hooks(receiver, 1)
    params = receipt.params
    assert params["messageId"] == result.provider_message_id
    assert params["timestamp"].isdigit()
    assert verify_webhook(credentials, params)
    assert not verify_webhook({**credentials, "signature_secret": "wrong"}, params)


def test_the_sdks_own_signing_is_refused_by_a_checking_server(sim: Sim, receiver: Receiver) -> None:
    # Why the adapter signs through its own Auth: the SDK also signs the None fields of
    # SmsMessage, which the form then leaves out, so the server's sig never matches.
    secret = secrets.token_hex(16)
    register_vonage(sim, signature_secret=secret, signature_method="sha256")
    client = Vonage(
        Auth(api_key=API_KEY, signature_secret=secret, signature_method="sha256"),
        HttpClientOptions(rest_host=sim.tls_host),
    )
    with pytest.raises(SmsError, match="error code 14"):
        client.sms.send(SmsMessage(to=TO.removeprefix("+"), from_="ACME", text="hi"))


@pytest.mark.parametrize(
    "adapter_signs_with",
    [
        "not-the-accounts",  # a wrong sig
        None,  # no sig at all, for an account that requires them
    ],
)
def test_a_wrong_or_missing_signature_is_status_14_and_permanent(
    sim: Sim, receiver: Receiver, adapter_signs_with: str | None
) -> None:
    register_vonage(sim, signature_secret="the-accounts", signature_method="sha256")
    extra = {"signature_secret": adapter_signs_with} if adapter_signs_with else {}
    with pytest.raises(PermanentProviderError) as refused:
        vonage(sim, signature_method="sha256", **extra).send(request(receiver, "vonage"))
    assert refused.value.code == "14"
    assert not isinstance(refused.value, TransientProviderError)
    assert handsets(sim, "vonage") == []


def test_unregistered_accounts_get_unsigned_receipts(sim: Sim, receiver: Receiver) -> None:
    credentials = vonage_credentials(sim, signature_secret="whatever")
    VonageProvider(credentials, sim.settings).send(request(receiver, "vonage"))
    [receipt] = hooks(receiver, 1)
    assert "sig" not in receipt.params
    assert not verify_webhook(credentials, receipt.params)


@pytest.mark.parametrize(
    ("receipt_format", "method", "content_type"),
    [
        ("post_form", "POST", "application/x-www-form-urlencoded"),
        ("get", "GET", None),
        ("post_json", "POST", "application/json"),
    ],
)
def test_vonage_receipts_as_get_form_or_json(
    sim: Sim, receiver: Receiver, receipt_format: str, method: str, content_type: str | None
) -> None:
    script(sim, receipt_format=receipt_format)
    secret = secrets.token_hex(16)
    register_vonage(sim, signature_secret=secret, signature_method="sha512")
    credentials = vonage_credentials(sim, signature_secret=secret, signature_method="sha512")
    sent = request(receiver, "vonage")
    VonageProvider(credentials, sim.settings).send(sent)
    [receipt] = hooks(receiver, 1)
    assert receipt.method == method
    assert receipt.headers.get("content-type") == content_type
    assert receipt.path.startswith(f"/callbacks/vonage?messageSid={sent.idempotency_key}")
    params = receipt.params
    if method == "GET":  # the callback URL's own query comes along, outside the signature
        assert params.pop("messageSid") == sent.idempotency_key
    assert params["client-ref"] == sent.idempotency_key
    assert verify_webhook(credentials, params)


# Dropped connections: the request went out, the answer never came back.


def test_the_vonage_sdk_left_alone_posts_a_dropped_send_again(sim: Sim, receiver: Receiver) -> None:
    # The hazard the adapter's options remove (see the contract suite for the adapters).
    script(sim, next_errors=["drop_connection"])
    client = Vonage(
        Auth(api_key=API_KEY, api_secret=API_SECRET), HttpClientOptions(rest_host=sim.tls_host)
    )
    response = client.sms.send(SmsMessage(to=TO.removeprefix("+"), from_="ACME", text="hi"))
    assert response.messages[0].status == "0"
    assert requests_of(sim, "vonage") == 2
    assert len(handsets(sim, "vonage")) == 2  # the handset got it twice


@pytest.mark.parametrize("provider", ["vonage", "twilio", "simulator"])
def test_adapters_post_a_dropped_send_once(sim: Sim, receiver: Receiver, provider: str) -> None:
    script(sim, next_errors=["drop_connection"])
    adapter: Provider
    if provider == "vonage":
        adapter = vonage(sim)
    elif provider == "twilio":
        adapter = TwilioProvider(
            {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "base_url": sim.url},
            sim.settings,
        )
    else:
        adapter = SimulatorProvider({"base_url": sim.url, **new_credentials()}, sim.settings)
    with pytest.raises(InDoubtProviderError):
        adapter.send(request(receiver, provider))
    adapter.close()
    assert requests_of(sim, provider) == 1
    assert len(handsets(sim, provider)) == 1


# Callback delivery under load: one client and a bounded queue per target.


def test_callbacks_beyond_the_queue_limit_are_dropped_and_counted(
    sim: Sim, receiver: Receiver
) -> None:
    script(sim, callback_queue_limit=1, callback_concurrency=1, delivery_delay_ms=0)
    try:
        with httpx.Client(base_url=sim.url) as client:
            for _ in range(30):
                body = {"to": TO, "from": FROM, "body": "hi", "statusCallback": receiver.url("/x")}
                assert client.post("/messages", json=body).status_code == 201
        time.sleep(1)
        dropped = sim.control.get("/stats").json()["callbacks"]["dropped"]
        received = receiver.hooks.qsize()
        assert dropped > 0
        assert 0 < received < 60  # 30 messages, 2 callbacks each
    finally:
        script(sim, callback_queue_limit=10_000, callback_concurrency=32)
