"""Twilio Programmable Messaging through the official `twilio` SDK.

Credentials: `account_sid`, `auth_token`, optionally `messaging_service_sid` (sends through the
service instead of a From number) and `base_url` (another API host: the simulator).

Two transports, both the SDK's own: `send`, `find` and `status_of` go through its `requests`
client; `send_async` (`SendsAsync`: a worker sends a batch's messages side by side on its send
loop) through its aiohttp client, `AsyncTwilioHttpClient`, and the SDK's `create_async`. How a
failed send is classified, either way (see shared.providers.http_errors):

| failure                                                        | error      |
|----------------------------------------------------------------|------------|
| connection refused, DNS failure (NewConnectionError,           | transient  |
| NameResolutionError), requests.ConnectTimeout, TLS handshake;  |            |
| aiohttp: ClientConnectorError, ConnectionTimeoutError          |            |
| HTTP 429, Twilio 20429 (throttled), 21611 and 30001 (sender's  | transient  |
| queue full: refused before sending), HTTP 503 (Twilio's        |            |
| "Service Unavailable": not processed)                          |            |
| requests.ReadTimeout; ConnectionError wrapping urllib3         | in doubt   |
| ProtocolError (RemoteDisconnected, ECONNRESET after the        |            |
| request was written); any other transport error; aiohttp: a   |            |
| timeout after connecting, ServerDisconnectedError, a reset or  |            |
| a broken body (any other ClientError)                          |            |
| HTTP 500, 502, 504 and other 5xx (Twilio's own, or a gateway's | in doubt   |
| that may have forwarded the request)                           |            |
| 21610 (recipient opted out)                                    | opted out  |
| any other 4xx (invalid number, content, credentials)           | permanent  |

A send in doubt is not repeated blindly: `find` lists the account's messages to see whether
Twilio has it (`searchable`)."""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, ClassVar

import aiohttp
import requests
from twilio.base.exceptions import (
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.providers.http_errors import classify_aiohttp_error, classify_requests_error
from shared.providers.interface import (
    InDoubtProviderError,
    PermanentProviderError,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)

# Twilio says these are safe to retry: never processed (20429) or a server-side failure.
THROTTLED = 20429
OPTED_OUT = 21610
# A status callback carrying one of these: the recipient replied STOP to our sender.
OPT_OUT_ERROR_CODES = frozenset({str(OPTED_OUT)})
# Refused before anything went out: too many throttled (21611) or queued (30001) messages
# for the sender. Worth trying again later.
TRANSIENT_CODES = frozenset({THROTTLED, 21611, 30001})
# Twilio's "Service Unavailable": the request was refused, not processed.
NOT_PROCESSED_HTTP_STATUSES = frozenset({429, 503})
MAX_VALIDITY_SECONDS = 36_000
# Twilio's clock against ours: a message it dates up to this much before the send began is
# still taken as that send's. Wider risks matching an identical earlier text to the same
# recipient; narrower, missing ours when the clocks disagree.
CLOCK_SKEW = timedelta(seconds=60)
# How many of the recipient's newest messages `find` reads at most (it stops at the first
# older than the send): a bound on one lookup, not a page of history.
FIND_LIMIT = 200
FIND_PAGE_SIZE = 50


class TwilioProvider:
    name: ClassVar[str] = "twilio"
    # Message creation takes no idempotency key: a send in doubt must not be repeated.
    idempotent: ClassVar[bool] = False
    # But Twilio lists an account's messages by recipient and sender: a send in doubt can be
    # looked up.
    searchable: ClassVar[bool] = True

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        timeout = settings.provider_timeout.total_seconds()
        account_sid, auth_token = str(credentials["account_sid"]), str(credentials["auth_token"])
        self._http = TwilioHttpClient(timeout=timeout)
        self._client = Client(account_sid, auth_token, http_client=self._http)
        # The SDK binds a client to one transport: a second one for the event loop.
        self._async_http = _LoopHttpClient(timeout, max(1, settings.worker_send_threads))
        self._async_client = Client(account_sid, auth_token, http_client=self._async_http)
        if credentials.get("base_url"):
            self._client.api.base_url = str(credentials["base_url"])
            self._async_client.api.base_url = str(credentials["base_url"])
        self._messaging_service_sid = credentials.get("messaging_service_sid")
        # The SDK loads its resource modules on first use; do it now, not on the first send
        # (which would then leave later than its rate-limit slot).
        self._messages = self._client.messages
        self._async_messages = self._async_client.messages

    def send(self, request: SendRequest) -> SendResult:
        try:
            message = self._messages.create(**self._create_args(request))
        except requests.RequestException as exc:
            raise classify_requests_error(exc) from exc
        except TwilioException as exc:
            raise _sdk_error(exc) from exc
        return _result(message)

    async def send_async(self, request: SendRequest) -> SendResult:
        """`send` on the worker's event loop, through the SDK's aiohttp client: a batch's
        sends go side by side on one thread, at a fraction of `requests`' CPU per call."""
        try:
            message = await self._async_messages.create_async(**self._create_args(request))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify_aiohttp_error(exc) from exc
        except TwilioException as exc:
            raise _sdk_error(exc) from exc
        return _result(message)

    def _create_args(self, request: SendRequest) -> dict[str, Any]:
        sender: dict[str, str] = (
            {"messaging_service_sid": str(self._messaging_service_sid)}
            if self._messaging_service_sid
            else {"from_": request.sender}
        )
        return dict(
            to=request.to,
            body=request.body,
            status_callback=request.status_callback_url,
            validity_period=max(1, min(request.validity_seconds, MAX_VALIDITY_SECONDS)),
            **sender,
        )

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        """Twilio's record of this send, if it has one: the recipient's newest messages from
        our sender (or, through a Messaging Service, from that service), matched on the exact
        body and on a creation time no earlier than the send (less CLOCK_SKEW).

        No DateSent filter: Twilio's is day-granular, and a message still queued has no
        date_sent at all, so it would hide the very message we look for. The list comes
        newest first; reading stops at the first message created before the send."""
        since = _utc(sent_after) - CLOCK_SKEW
        sender: dict[str, str] = {} if self._messaging_service_sid else {"from_": request.sender}
        try:
            listed = self._messages.stream(to=request.to, page_size=FIND_PAGE_SIZE, **sender)
            for message in islice(listed, FIND_LIMIT):
                created = message.date_created
                if created is not None and _utc(created) < since:
                    break
                if self._messaging_service_sid and (
                    str(message.messaging_service_sid) != str(self._messaging_service_sid)
                ):
                    continue
                if (
                    message.body == request.body
                    and _outbound(message.direction)
                    and str(message.sid) not in taken
                ):
                    return _result(message)
        except (TwilioException, requests.RequestException) as exc:
            raise _asking_failed(exc) from exc
        return None

    def status_of(self, provider_message_id: str) -> str | None:
        """Twilio's status word for the message now (queued, sent, delivered, ...)."""
        try:
            message = self._messages(provider_message_id).fetch()
        except (TwilioException, requests.RequestException) as exc:
            raise _asking_failed(exc) from exc
        return str(message.status) if message.status is not None else None

    def close(self) -> None:
        self._http.session = None
        # The aiohttp session belongs to the send loop, which closes it with itself.
        self._async_http.session = None


class _LoopHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # the SDK is untyped
    """The SDK's aiohttp client, with what it leaves out for a long-lived worker: its session
    is made on the event loop that sends (on first use, not where the adapter is built), with
    at most `connections` connections; every request gets the client's timeout (the SDK
    passes none, which aiohttp takes as no limit at all); and the Basic credentials go as a
    header (aiohttp deprecates its `auth` argument, and 4.0 drops it)."""

    session: aiohttp.ClientSession | None

    def __init__(self, timeout: float, connections: int) -> None:
        super().__init__(pool_connections=False, timeout=timeout)
        self._connections = connections

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections)
            )
        if auth is not None:
            basic = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers = {**(headers or {}), "Authorization": "Basic " + basic}
        return await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            timeout=timeout if timeout is not None else self.timeout,
            allow_redirects=allow_redirects,
        )


def _sdk_error(exc: TwilioException) -> ProviderError:
    """What the SDK raised for an answer, or around a request it cannot read."""
    if isinstance(exc, TwilioRestException):
        return _classify(exc.status, exc.code, str(exc.msg))
    if isinstance(exc, TwilioServiceException):
        # The RFC 9457 problem-details body the SDK reads into its own class.
        return _classify(exc.status, exc.code, str(exc.detail or exc.title))
    # An answer it cannot read: the request may have gone.
    return InDoubtProviderError("error", str(exc))


def _result(message: Any) -> SendResult:
    return SendResult(
        provider_message_id=str(message.sid),
        provider_status=str(message.status),
        raw={
            "sid": message.sid,
            "status": message.status,
            "num_segments": message.num_segments,
        },
    )


def _utc(moment: datetime) -> datetime:
    # Twilio's dates are UTC; a naive datetime of ours is taken as UTC too.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _outbound(direction: Any) -> bool:
    return str(getattr(direction, "value", direction) or "").startswith("outbound")


def _asking_failed(exc: Exception) -> TransientProviderError:
    """Any failure to look something up: nothing was sent, so asking again later is safe."""
    if isinstance(exc, TwilioRestException | TwilioServiceException):
        return TransientProviderError(str(exc.code or exc.status), str(exc))
    return TransientProviderError("lookup", str(exc) or type(exc).__name__)


def _classify(status: Any, code: Any, text: str) -> ProviderError:
    """The same for either error body Twilio answers with (classic or RFC 9457)."""
    http_status = _int(status) or 0
    number = _int(code)
    code_text = str(number or http_status)
    if http_status in NOT_PROCESSED_HTTP_STATUSES or number in TRANSIENT_CODES:
        return TransientProviderError(code_text, text)
    if http_status >= 500:
        # Twilio's own 500, or a gateway's 502/504 that may have passed the request on.
        return InDoubtProviderError(code_text, text)
    if code_text in OPT_OUT_ERROR_CODES:
        return RecipientOptedOut(code_text, text)
    return PermanentProviderError(code_text, text)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@register("twilio", requires=("account_sid", "auth_token"))
def _twilio(credentials: Mapping[str, Any], settings: Settings) -> TwilioProvider:
    return TwilioProvider(credentials, settings)


# How Twilio's message statuses (every value of the SDK's MessageInstance.Status) map onto
# our lifecycle (callbacks repeat and come in any order; apply_status keeps only forward moves).
TWILIO_STATUSES: dict[str, MessageStatus] = {
    "accepted": MessageStatus.QUEUED,
    "scheduled": MessageStatus.QUEUED,
    "queued": MessageStatus.QUEUED,
    "sending": MessageStatus.SENDING,
    "sent": MessageStatus.SENT,
    # Some parts of a long text reached the handset and the rest may still: not final.
    "partially_delivered": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
    "canceled": MessageStatus.FAILED,
    # Inbound words, never ours to apply: stored, as Vonage's "unknown" is.
    "receiving": MessageStatus.QUEUED,
    "received": MessageStatus.QUEUED,
}
SIGNATURE_HEADER = "X-Twilio-Signature"


def verify_webhook(
    credentials: Mapping[str, Any], url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    """Twilio's own check: HMAC-SHA1 with the auth token over the public URL + sorted params."""
    if not signature:
        return False
    validator = RequestValidator(str(credentials["auth_token"]))
    return bool(validator.validate(url, dict(params), signature))
