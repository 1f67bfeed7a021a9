"""Vonage SMS API through the official `vonage` SDK.

Credentials: `api_key`, `api_secret`, optionally `signature_secret` and `signature_method`
(`md5hash`, the dashboard's "MD5 hash", or HMAC `md5`, `sha1`, `sha256` (the default here),
`sha512`): requests are then signed, and so are the account's delivery receipts. Also
`rest_host` (another API host: the simulator).

How a failed send is classified (the SDK speaks `requests`; see shared.providers.http_errors):

| failure                                                        | error      |
|----------------------------------------------------------------|------------|
| connection refused, DNS failure (NewConnectionError,           | transient  |
| NameResolutionError), requests.ConnectTimeout, TLS handshake   |            |
| HTTP 429 (RateLimitedError), HTTP 503 (Vonage's front door     | transient  |
| refusing: not processed); status 1 (throttled), 10 (too many   |            |
| binds): refused before sending                                 |            |
| requests.ReadTimeout; ConnectionError wrapping urllib3         | in doubt   |
| ProtocolError (RemoteDisconnected, ECONNRESET after the        |            |
| request was written); any other transport error               |            |
| HTTP 500 (ServerError), 502, 504 and other 5xx; status 5       | in doubt   |
| ("internal error": Vonage may have taken it)                   |            |
| every other status (invalid number, 14 bad signature, ...) and | permanent  |
| other 4xx                                                      |            |

A send in doubt cannot be resolved here: the SMS API lists no messages and answers no status
lookups (`searchable` False, `status_of` None)."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import requests
from vonage import Auth, HttpClientOptions, Vonage
from vonage_http_client.errors import HttpRequestError, RateLimitedError, ServerError
from vonage_sms import SmsMessage
from vonage_sms.errors import PartialFailureError, SmsError

from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.providers.http_errors import classify_requests_error
from shared.providers.interface import (
    InDoubtProviderError,
    PermanentProviderError,
    ProviderError,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)
from shared.text.segments import measure

# Per-message status codes Vonage documents as worth retrying and that say nothing went out:
# throttled, too many existing binds. 14 (invalid signature) is a configuration error: final.
TRANSIENT_STATUSES = {"1", "10"}
# "Internal error": Vonage failed somewhere after taking the request; it may have sent it.
IN_DOUBT_STATUSES = {"5"}
# Refusals at Vonage's front door (throttled, unavailable): nothing was processed. Other 5xx
# (500, a gateway's 502/504) may come after the request was passed on: in doubt.
TRANSIENT_HTTP_STATUSES = {429, 503}
MAX_CALLBACK_LENGTH = 100  # the SMS API refuses longer callback URLs
HMAC_METHODS = ("md5", "sha1", "sha256", "sha512")
SIGNATURE_METHODS = ("md5hash", *HMAC_METHODS)
DEFAULT_SIGNATURE_METHOD = "sha256"
_STATUS = re.compile(r"error code (\d+)")


def _signing_string(params: Mapping[str, Any]) -> str:
    # Vonage's canonical form: "&key=value" sorted by key, '&' and '=' in values as '_'.
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, str):
            value = value.replace("&", "_").replace("=", "_")
        parts.append(f"&{key}={value}")
    return "".join(parts)


def signature(params: Mapping[str, Any], secret: str, method: str) -> str:
    """`sig` over `params` (without `sig`; `timestamp` included) as Vonage computes it: the MD5
    hash of the canonical string with the secret appended, or the SDK's HMAC for the others."""
    if method == "md5hash":
        text = _signing_string(params) + secret
        return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - Vonage's own algorithm
    if method not in HMAC_METHODS:
        raise ValueError(f"unknown signature method {method!r}")
    signer = Auth(api_key="signer", signature_secret=secret, signature_method=method)
    return str(signer.sign_params(dict(params)))


class _SigningAuth(Auth):  # type: ignore[misc]
    """The SDK's Auth (its supported way in: `Vonage(auth, ...)`), signing requests with the
    account's method, "MD5 hash" included, over the parameters that are actually sent: the
    SDK signs the None fields of its SmsMessage, which its form encoding then leaves out."""

    def __init__(self, credentials: Mapping[str, Any]) -> None:
        method = str(credentials.get("signature_method") or DEFAULT_SIGNATURE_METHOD)
        if method not in SIGNATURE_METHODS:
            raise PermanentProviderError("configuration", f"unknown signature_method {method!r}")
        super().__init__(
            api_key=str(credentials["api_key"]),
            api_secret=str(credentials["api_secret"]),
            signature_secret=credentials.get("signature_secret") or None,
            signature_method="md5" if method == "md5hash" else method,
        )
        self._method = method

    def sign_params(self, params: dict[str, Any]) -> str:
        for key in [key for key, value in params.items() if value is None]:
            del params[key]
        if not params.get("timestamp"):
            params["timestamp"] = int(time.time())
        return signature(params, str(self._signature_secret), self._method)


class VonageProvider:
    name: ClassVar[str] = "vonage"
    # client-ref is only echoed back, not deduplicated: a send in doubt must not be repeated.
    idempotent: ClassVar[bool] = False
    # And the SMS API cannot list what was sent: a send in doubt stays in doubt.
    searchable: ClassVar[bool] = False

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        self._auth = _SigningAuth(credentials)
        # The SDK POSTs again, up to pool_maxsize times, when the connection drops after the
        # request went out (RemoteDisconnected): the message would reach the handset twice.
        # One connection per client turns that off; a client per thread keeps sends parallel
        # (and keeps the threads off each other's headers, which the SDK's client mutates).
        self._options = HttpClientOptions(
            rest_host=str(credentials.get("rest_host") or "rest.nexmo.com"),
            timeout=max(1, int(settings.provider_timeout.total_seconds())),
            pool_connections=1,
            pool_maxsize=1,
        )
        self._local = threading.local()
        self._client()  # the SDK builds every API client up front: not on the first send

    def _client(self) -> Any:
        client = getattr(self._local, "vonage", None)
        if client is None:
            client = self._local.vonage = Vonage(self._auth, self._options)
        return client

    def send(self, request: SendRequest) -> SendResult:
        message = SmsMessage(
            to=request.to.removeprefix("+"),
            from_=request.sender.removeprefix("+"),
            text=request.body,
            type="unicode" if measure(request.body).encoding == "ucs2" else "text",
            # Our sid, echoed in every delivery receipt: matches even before we know their id.
            client_ref=request.idempotency_key,
            callback=_callback(request.status_callback_url),
            ttl=min(max(request.validity_seconds * 1000, 20_000), 604_800_000),
        )
        try:
            response = self._client().sms.send(message)
        except PartialFailureError as exc:
            return _partial(exc.response)
        except SmsError as exc:
            raise _refusal(_status_of(exc), str(exc)) from exc
        except (RateLimitedError, ServerError, HttpRequestError) as exc:
            status = exc.response.status_code
            error: type[ProviderError] = (
                TransientProviderError
                if status in TRANSIENT_HTTP_STATUSES
                else InDoubtProviderError
                if status >= 500
                else PermanentProviderError
            )
            raise error(str(status), str(exc)) from exc
        except requests.RequestException as exc:
            raise classify_requests_error(exc) from exc
        sent = response.messages[0]
        parts = tuple(str(part.message_id) for part in response.messages)
        return SendResult(
            provider_message_id=str(sent.message_id),
            provider_status=str(sent.status),
            raw=sent.model_dump(mode="json", by_alias=True),
            parts=parts if len(parts) > 1 else (),
        )

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        raise NotImplementedError("the Vonage SMS API cannot list sent messages")

    def status_of(self, provider_message_id: str) -> str | None:
        # The SMS API answers no status lookups: only delivery receipts tell.
        return None

    def close(self) -> None:
        pass


def _partial(answer: Mapping[str, Any]) -> SendResult:
    """A long text Vonage took only some parts of: what went out is sent, so it must not be
    sent again; only when no part went out is it an error, judged by the first refusal."""
    messages: list[Mapping[str, Any]] = list(answer.get("messages") or [])
    taken = [part for part in messages if str(part.get("status")) == "0"]
    refused = [part for part in messages if str(part.get("status")) != "0"]
    if not taken:
        first = refused[0] if refused else {}
        status = str(first.get("status", "error"))
        raise _refusal(status, str(first.get("error-text", "every part refused")))
    return SendResult(
        provider_message_id=str(taken[0]["message-id"]),
        provider_status="0",
        raw=dict(answer),
        parts=tuple(str(part["message-id"]) for part in taken),
        unsent_parts=len(refused),
    )


def _refusal(status: str, text: str) -> ProviderError:
    if status in TRANSIENT_STATUSES:
        return TransientProviderError(status, text)
    if status in IN_DOUBT_STATUSES:
        return InDoubtProviderError(status, text)
    return PermanentProviderError(status, text)


def _status_of(exc: SmsError) -> str:
    match = _STATUS.search(str(exc))
    return match.group(1) if match else "error"


def _callback(url: str) -> str | None:
    # Our sid also travels as client-ref, so the query string can go if the URL is too long;
    # with no URL at all the account's default delivery receipt URL is used.
    for candidate in (url, url.partition("?")[0]):
        if len(candidate) <= MAX_CALLBACK_LENGTH:
            return candidate
    return None


@register("vonage", requires=("api_key", "api_secret"))
def _vonage(credentials: Mapping[str, Any], settings: Settings) -> VonageProvider:
    return VonageProvider(credentials, settings)


# Delivery receipt statuses; `accepted`/`buffered` mean the network has it, not the handset.
VONAGE_STATUSES: dict[str, MessageStatus] = {
    "accepted": MessageStatus.SENT,
    "buffered": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "expired": MessageStatus.EXPIRED,
    "failed": MessageStatus.FAILED,
    "rejected": MessageStatus.REJECTED,
    "unknown": MessageStatus.QUEUED,  # says nothing new: stored, never applied
}


def verify_webhook(credentials: Mapping[str, Any], params: Mapping[str, str]) -> bool:
    """Vonage's check of `sig` with the signature secret and the account's method (an
    unknown method never passes); unsigned webhooks never pass."""
    secret = credentials.get("signature_secret")
    sig = params.get("sig")
    method = str(credentials.get("signature_method") or DEFAULT_SIGNATURE_METHOD)
    if not secret or not sig or method not in SIGNATURE_METHODS or not params.get("timestamp"):
        return False
    signed = {key: value for key, value in params.items() if key != "sig"}
    try:
        expected = signature(signed, str(secret), method)
    except Exception:  # a malformed webhook is refused, never an error
        return False
    return hmac.compare_digest(expected, sig.lower())
