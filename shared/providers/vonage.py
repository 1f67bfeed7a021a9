"""Vonage SMS API through the official `vonage` SDK.

Credentials: `api_key`, `api_secret`, optionally `signature_secret` and `signature_method`
(requests are then signed, and delivery receipts must be: unsigned ones are refused), and
`rest_host` (another API host: the simulator)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import requests
from vonage import Auth, HttpClientOptions, Vonage
from vonage_http_client.errors import HttpRequestError, RateLimitedError, ServerError
from vonage_sms import SmsMessage
from vonage_sms.errors import SmsError

from shared.models import MessageStatus
from shared.providers import (
    PermanentProviderError,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)
from shared.segments import measure
from shared.settings import Settings

# Per-message status codes Vonage documents as worth retrying: throttled, internal error.
TRANSIENT_STATUSES = {"1", "5"}
MAX_CALLBACK_LENGTH = 100  # the SMS API refuses longer callback URLs
_STATUS = re.compile(r"error code (\d+)")


class VonageProvider:
    name: ClassVar[str] = "vonage"
    # client-ref is only echoed back, not deduplicated: a send in doubt must not be repeated.
    idempotent: ClassVar[bool] = False

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        auth = Auth(
            api_key=str(credentials["api_key"]),
            api_secret=str(credentials["api_secret"]),
            signature_secret=credentials.get("signature_secret"),
            signature_method=credentials.get("signature_method", "sha256"),
        )
        options = HttpClientOptions(
            rest_host=str(credentials.get("rest_host") or "rest.nexmo.com"),
            timeout=max(1, int(settings.provider_timeout.total_seconds())),
        )
        self._vonage = Vonage(auth, options)

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
            response = self._vonage.sms.send(message)
        except SmsError as exc:
            status = _status_of(exc)
            if status in TRANSIENT_STATUSES:
                raise TransientProviderError(status, str(exc)) from exc
            raise PermanentProviderError(status, str(exc)) from exc
        except (RateLimitedError, ServerError) as exc:
            raise TransientProviderError(str(exc.response.status_code), str(exc)) from exc
        except HttpRequestError as exc:
            raise PermanentProviderError(str(exc.response.status_code), str(exc)) from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise TransientProviderError("timeout", str(exc) or type(exc).__name__) from exc
        sent = response.messages[0]
        return SendResult(
            provider_message_id=str(sent.message_id),
            provider_status=str(sent.status),
            raw=sent.model_dump(mode="json", by_alias=True),
        )

    def close(self) -> None:
        pass


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
    """Vonage's own check of `sig` with the signature secret; unsigned receipts never pass."""
    secret = credentials.get("signature_secret")
    if not secret or not params.get("sig"):
        return False
    auth = Auth(
        api_key=str(credentials["api_key"]),
        signature_secret=str(secret),
        signature_method=credentials.get("signature_method", "sha256"),
    )
    return bool(auth.check_signature(dict(params)))
