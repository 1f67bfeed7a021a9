"""The simulator provider: talks HTTP to `sms-dispatch simulator`, a stand-in for a real SMS
provider with configurable latency and failures that calls our status callback like one."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

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

IDEMPOTENCY_HEADER = "Idempotency-Key"
OPTED_OUT = "21610"
SIGNATURE_HEADER = "X-Simulator-Signature"

# The simulator's statuses are Twilio's words; this is how they map onto our lifecycle.
SIMULATOR_STATUSES: dict[str, MessageStatus] = {
    "accepted": MessageStatus.QUEUED,
    "queued": MessageStatus.QUEUED,
    "sending": MessageStatus.SENDING,
    "sent": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
}


def sign(secret: str, url: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over the full callback URL followed by the raw body."""
    return hmac.new(secret.encode(), url.encode() + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, url: str, body: bytes, signature: str | None) -> bool:
    return signature is not None and hmac.compare_digest(sign(secret, url, body), signature)


class SimulatorProvider:
    name: ClassVar[str] = "simulator"
    # The simulator keeps the first answer for an Idempotency-Key, as Stripe-style APIs do.
    idempotent: ClassVar[bool] = True

    def __init__(self, credentials: Mapping[str, Any], settings: Settings) -> None:
        base_url = str(credentials.get("base_url") or settings.simulator_url)
        self._client = httpx.Client(
            base_url=base_url,
            timeout=settings.provider_timeout.total_seconds(),
            limits=httpx.Limits(max_connections=settings.worker_concurrency),
        )

    def send(self, request: SendRequest) -> SendResult:
        try:
            response = self._client.post(
                "/messages",
                json={
                    "to": request.to,
                    "from": request.sender,
                    "body": request.body,
                    "statusCallback": request.status_callback_url,
                    "validityPeriod": request.validity_seconds,
                },
                headers={IDEMPOTENCY_HEADER: request.idempotency_key},
            )
        except httpx.TimeoutException as exc:
            raise TransientProviderError("timeout", str(exc) or "provider timed out") from exc
        except httpx.TransportError as exc:
            raise TransientProviderError("connection", str(exc) or type(exc).__name__) from exc
        data: dict[str, Any] = _json(response)
        if response.status_code in (200, 201):
            return SendResult(
                provider_message_id=str(data["id"]),
                provider_status=str(data.get("status", "queued")),
                raw=data,
            )
        code = str(data.get("code", response.status_code))
        text = str(data.get("message", response.reason_phrase))
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientProviderError(code, text)
        if code == OPTED_OUT:  # the simulator speaks Twilio's error codes
            raise RecipientOptedOut(code, text)
        raise PermanentProviderError(code, text)

    def close(self) -> None:
        self._client.close()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@register("simulator")
def _simulator(credentials: Mapping[str, Any], settings: Settings) -> SimulatorProvider:
    return SimulatorProvider(credentials, settings)
