"""The simulator provider: talks HTTP to `sms-dispatch simulator`, a stand-in for a real SMS
provider with configurable latency and failures that calls our status callback like one.

Credentials: `account_id` (public, "SA" + 32 hex) and `signing_secret`, sent as HTTP Basic
auth on every send, as Twilio takes AccountSid:AuthToken; the simulator signs that message's
callbacks with the secret. Without them it still takes the send, but its callbacks go out
unsigned (and the API refuses them). Optionally `base_url` (another simulator).

How a failed send is classified (httpx; see shared.providers.http_errors):

| failure                                                        | error      |
|----------------------------------------------------------------|------------|
| httpx.ConnectError (refused, DNS, TLS handshake),              | transient  |
| ConnectTimeout, PoolTimeout: never written                     |            |
| HTTP 429, HTTP 503 (the simulator's "not processed"), Twilio's | transient  |
| codes 20429, 21611, 30001                                      |            |
| ReadTimeout, WriteTimeout, ReadError, WriteError,              | in doubt   |
| RemoteProtocolError (closed or reset before the answer)        |            |
| HTTP 500, 502, 504 and other 5xx                               | in doubt   |
| 21610 (recipient opted out)                                    | opted out  |
| other 4xx                                                      | permanent  |

In doubt is cheap here: the simulator deduplicates on the Idempotency-Key (`idempotent`),
so the send is simply made again and answers with the first copy's message."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from base64 import b64encode
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import httpx

from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.providers.http_errors import classify_aiohttp_error, classify_httpx_error
from shared.providers.interface import (
    InDoubtProviderError,
    PermanentProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
OPTED_OUT = "21610"
# Twilio's codes for a sender whose queue is full: nothing was sent, so a later try is fine.
TRANSIENT_CODES = frozenset({"20429", "21611", "30001"})
# The simulator's answers that say the send was refused unprocessed.
NOT_PROCESSED_HTTP_STATUSES = frozenset({429, 503})
SIGNATURE_HEADER = "X-Simulator-Signature"
TIMESTAMP_HEADER = "X-Simulator-Timestamp"
ACCOUNT_ID_PREFIX = "SA"

# The simulator's statuses are Twilio's words; this is how they map onto our lifecycle.
SIMULATOR_STATUSES: dict[str, MessageStatus] = {
    "accepted": MessageStatus.QUEUED,
    "scheduled": MessageStatus.QUEUED,
    "queued": MessageStatus.QUEUED,
    "sending": MessageStatus.SENDING,
    "sent": MessageStatus.SENT,
    "partially_delivered": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
    "canceled": MessageStatus.FAILED,
}


def new_credentials() -> dict[str, str]:
    """A fresh simulator provider account: its public id and the secret that signs its callbacks."""
    return {
        "account_id": ACCOUNT_ID_PREFIX + secrets.token_hex(16),
        "signing_secret": secrets.token_hex(32),
    }


def sign(secret: str, timestamp: str | int, url: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over "<timestamp>." + the full callback URL + the raw body: the
    timestamp is signed so a captured callback cannot be replayed later as a fresh one."""
    message = f"{timestamp}.".encode() + url.encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str, timestamp: str | int | None, url: str, body: bytes, signature: str | None
) -> bool:
    """Constant-time check of a callback's signature; the caller judges the timestamp's age."""
    if not secret or not signature or timestamp is None or timestamp == "":
        return False
    return hmac.compare_digest(sign(secret, timestamp, url, body), signature)


class SimulatorProvider:
    name: ClassVar[str] = "simulator"
    # The simulator keeps the first answer for an Idempotency-Key, as Stripe-style APIs do.
    idempotent: ClassVar[bool] = True
    # No need to look a send in doubt up: sending it again is safe.
    searchable: ClassVar[bool] = False

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        base_url = str(credentials.get("base_url") or settings.simulator_url)
        account_id, secret = credentials.get("account_id"), credentials.get("signing_secret")
        self._client = httpx.Client(
            base_url=base_url,
            auth=(str(account_id), str(secret)) if account_id and secret else None,
            timeout=settings.provider_timeout.total_seconds(),
            limits=httpx.Limits(max_connections=settings.worker_concurrency),
        )
        self._base_url = base_url
        # The same Basic credentials as the httpx client's, as a header (aiohttp 4 drops
        # BasicAuth objects).
        self._auth_headers = (
            {"Authorization": "Basic " + b64encode(f"{account_id}:{secret}".encode()).decode()}
            if account_id and secret
            else {}
        )
        self._timeout = settings.provider_timeout.total_seconds()
        self._connections = max(1, settings.worker_send_threads)
        self._async_session: aiohttp.ClientSession | None = None

    def send(self, request: SendRequest) -> SendResult:
        try:
            response = self._client.post(
                "/messages", json=_payload(request), headers=_headers(request)
            )
        except httpx.TransportError as exc:
            raise classify_httpx_error(exc) from exc
        return _answer(response.status_code, _json(response), response.reason_phrase)

    async def send_async(self, request: SendRequest) -> SendResult:
        """`send` on the worker's event loop (aiohttp): a tenth of httpx's CPU per call, so a
        batch's sends run side by side on one thread."""
        session = self._session()
        try:
            async with session.post(
                "/messages", json=_payload(request), headers=_headers(request)
            ) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = {}
                return _answer(
                    response.status, data if isinstance(data, dict) else {}, response.reason
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify_aiohttp_error(exc) from exc

    def _session(self) -> aiohttp.ClientSession:
        # Made on the event loop that uses it (the worker's one send loop), on first use.
        if self._async_session is None or self._async_session.closed:
            self._async_session = aiohttp.ClientSession(
                base_url=self._base_url,
                headers=self._auth_headers,
                timeout=aiohttp.ClientTimeout(
                    total=self._timeout, sock_connect=min(self._timeout, 5.0)
                ),
                connector=aiohttp.TCPConnector(limit=self._connections),
            )
        return self._async_session

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        raise NotImplementedError("the simulator is idempotent: a send in doubt is sent again")

    def status_of(self, provider_message_id: str) -> str | None:
        """The simulator's status word for the message now (it can be asked, as Twilio can)."""
        try:
            response = self._client.get(f"/messages/{quote(provider_message_id, safe='')}")
        except httpx.HTTPError as exc:
            raise TransientProviderError("lookup", str(exc) or type(exc).__name__) from exc
        if response.status_code != 200:
            raise TransientProviderError(str(response.status_code), response.text[:200])
        status = _json(response).get("status")
        return str(status) if status is not None else None

    def close(self) -> None:
        self._client.close()


def _payload(request: SendRequest) -> dict[str, Any]:
    return {
        "to": request.to,
        "from": request.sender,
        "body": request.body,
        "statusCallback": request.status_callback_url,
        "validityPeriod": request.validity_seconds,
    }


def _headers(request: SendRequest) -> dict[str, str]:
    return {IDEMPOTENCY_HEADER: request.idempotency_key}


def _answer(status: int, data: dict[str, Any], reason: str | None) -> SendResult:
    """The simulator's HTTP answer as a result, or the error it stands for."""
    if status in (200, 201):
        return SendResult(
            provider_message_id=str(data["id"]),
            provider_status=str(data.get("status", "queued")),
            raw=data,
        )
    code = str(data.get("code", status))
    text = str(data.get("message", reason or ""))
    if status in NOT_PROCESSED_HTTP_STATUSES or code in TRANSIENT_CODES:
        raise TransientProviderError(code, text)
    if status >= 500:
        # Its own 500, or a gateway's 502/504 that may have passed the request on.
        raise InDoubtProviderError(code, text)
    if code == OPTED_OUT:  # the simulator speaks Twilio's error codes
        raise RecipientOptedOut(code, text)
    raise PermanentProviderError(code, text)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@register("simulator")
def _simulator(credentials: Mapping[str, Any], settings: Settings) -> SimulatorProvider:
    return SimulatorProvider(credentials, settings)
