"""Twilio Programmable Messaging through the official `twilio` SDK.

Credentials: `account_sid`, `auth_token`, optionally `messaging_service_sid` (sends through the
service instead of a From number) and `base_url` (another API host: the simulator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import requests
from twilio.base.exceptions import (
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from shared.models import MessageStatus
from shared.providers import (
    PermanentProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)
from shared.settings import Settings

# Twilio says these are safe to retry: never processed (20429) or a server-side failure.
THROTTLED = 20429
OPTED_OUT = 21610
# A status callback carrying one of these: the recipient replied STOP to our sender.
OPT_OUT_ERROR_CODES = frozenset({str(OPTED_OUT)})
# Refused before anything went out: too many throttled (21611) or queued (30001) messages
# for the sender. Worth trying again later.
TRANSIENT_CODES = frozenset({THROTTLED, 21611, 30001})
MAX_VALIDITY_SECONDS = 36_000


class TwilioProvider:
    name: ClassVar[str] = "twilio"
    # Message creation takes no idempotency key: a send in doubt must not be repeated.
    idempotent: ClassVar[bool] = False

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        self._http = TwilioHttpClient(timeout=settings.provider_timeout.total_seconds())
        self._client = Client(
            str(credentials["account_sid"]), str(credentials["auth_token"]), http_client=self._http
        )
        if credentials.get("base_url"):
            self._client.api.base_url = str(credentials["base_url"])
        self._messaging_service_sid = credentials.get("messaging_service_sid")
        # The SDK loads its resource modules on first use; do it now, not on the first send
        # (which would then leave later than its rate-limit slot).
        self._messages = self._client.messages

    def send(self, request: SendRequest) -> SendResult:
        sender: dict[str, str] = (
            {"messaging_service_sid": str(self._messaging_service_sid)}
            if self._messaging_service_sid
            else {"from_": request.sender}
        )
        try:
            message = self._messages.create(
                to=request.to,
                body=request.body,
                status_callback=request.status_callback_url,
                validity_period=max(1, min(request.validity_seconds, MAX_VALIDITY_SECONDS)),
                **sender,
            )
        except TwilioRestException as exc:
            raise _classify(exc.status, exc.code, str(exc.msg)) from exc
        except TwilioServiceException as exc:
            # The RFC 9457 problem-details body the SDK reads into its own class.
            raise _classify(exc.status, exc.code, str(exc.detail or exc.title)) from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise TransientProviderError("timeout", str(exc) or type(exc).__name__) from exc
        except TwilioException as exc:
            raise TransientProviderError("error", str(exc)) from exc
        return SendResult(
            provider_message_id=str(message.sid),
            provider_status=str(message.status),
            raw={
                "sid": message.sid,
                "status": message.status,
                "num_segments": message.num_segments,
            },
        )

    def close(self) -> None:
        self._http.session = None


def _classify(status: Any, code: Any, text: str) -> Exception:
    """The same for either error body Twilio answers with (classic or RFC 9457)."""
    http_status = _int(status) or 0
    number = _int(code)
    code_text = str(number or http_status)
    if http_status == 429 or http_status >= 500 or number in TRANSIENT_CODES:
        return TransientProviderError(code_text, text)
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
