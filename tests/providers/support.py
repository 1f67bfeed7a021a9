"""Provider settings that point each real SDK at the simulator process, and signing helpers
that sign webhooks the way each provider does (with the SDKs' own code where they have it)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from twilio.request_validator import RequestValidator
from vonage_http_client.auth import Auth

from shared import accounts
from shared.db import Database
from shared.models import ProviderAccount
from shared.providers.simulator import SIGNATURE_HEADER, sign
from shared.settings import Settings
from tests.conftest import SENDER, TENANT

PROVIDERS = ["simulator", "twilio", "vonage"]
# Each provider's word for "the network has it" (a report that precedes "delivered").
SENT_WORD = {"simulator": "sent", "twilio": "sent", "vonage": "accepted"}
TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "twilio-auth-token-for-tests"
VONAGE_KEY = "vonagekey"
VONAGE_SECRET = "vonagesecret"


def credentials(provider: str, settings: Settings) -> dict[str, Any]:
    """Credentials for `provider` whose API host is the simulator (HTTP, or HTTPS for Vonage)."""
    if provider == "twilio":
        return {
            "account_sid": TWILIO_SID,
            "auth_token": TWILIO_TOKEN,
            "base_url": settings.simulator_url,
        }
    if provider == "vonage":
        return {
            "api_key": VONAGE_KEY,
            "api_secret": VONAGE_SECRET,
            "signature_secret": settings.simulator_signing_secret.get_secret_value(),
            "rest_host": f"127.0.0.1:{settings.simulator_tls_port}",
        }
    return {}


def use_providers(
    db: Database, settings: Settings, providers: list[str], **rates: float
) -> list[int]:
    """Make the demo account send through `providers`, in that priority order."""
    ids = []
    with db.transaction() as session:
        account = accounts.get_account(session, TENANT)
        session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account.id))
        for priority, provider in enumerate(providers):
            settings_row = accounts.set_provider(
                session,
                account,
                provider,
                sender_ids=[SENDER],
                credentials=credentials(provider, settings),
                priority=priority,
            )
            settings_row.sender_rate = rates.get("sender_rate")
            ids.append(settings_row.id)
    return ids


@dataclass(frozen=True)
class Webhook:
    """A webhook request as the provider would send it."""

    path: str
    params: dict[str, str]
    headers: dict[str, str]
    # A JSON webhook is signed over its exact bytes: sent as they are, never re-encoded.
    content: bytes | None = None


def status_webhook(
    provider: str, settings: Settings, sid: str, provider_id: str, status: str, *, forged: bool
) -> Webhook:
    """A delivery report for our message `sid`, signed as the provider signs (or forged)."""
    secret = settings.simulator_signing_secret.get_secret_value()
    if provider == "twilio":
        path = f"/callbacks/twilio?messageSid={sid}"
        params = {
            "MessageSid": provider_id,
            "SmsSid": provider_id,
            "AccountSid": TWILIO_SID,
            "MessageStatus": status,
            "SmsStatus": status,
            "To": "+972544696388",
            "From": SENDER,
            "ApiVersion": "2010-04-01",
        }
        token = "not-the-token" if forged else TWILIO_TOKEN
        url = settings.public_base_url + path
        signature = RequestValidator(token).compute_signature(url, params)
        return Webhook(path, params, {"X-Twilio-Signature": signature})
    if provider == "vonage":
        params = {
            "msisdn": "972544696388",
            "to": SENDER.removeprefix("+"),
            "messageId": provider_id,
            "status": status,
            "err-code": "0",
            "api-key": VONAGE_KEY,
            "client-ref": sid,
            "message-timestamp": "2026-11-27 12:00:00",
            # Signed too; without it the SDK's signer would add its own clock reading.
            "timestamp": str(int(time.time())),
        }
        key = "not-the-secret" if forged else secret
        params["sig"] = Auth(
            api_key=VONAGE_KEY, signature_secret=key, signature_method="sha256"
        ).sign_params(dict(params))
        return Webhook("/callbacks/vonage", params, {})
    path = f"/callbacks/simulator?messageSid={sid}"
    body = json.dumps({"id": provider_id, "status": status}).encode()
    url = settings.public_base_url + path
    signature = sign("not-the-secret" if forged else secret, url, body)
    headers = {SIGNATURE_HEADER: signature, "Content-Type": "application/json"}
    return Webhook(path, {}, headers, content=body)
