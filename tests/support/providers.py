"""Provider settings that point each real SDK at the simulator process, and signing helpers
that sign webhooks the way each provider does (with the SDKs' own code where they have it)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import delete
from twilio.request_validator import RequestValidator
from vonage_http_client.auth import Auth

from shared.accounts import provisioning
from shared.core.db import Database
from shared.core.models import ProviderAccount
from shared.core.settings import Settings
from shared.providers.simulator import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.data import SENDER, TENANT

PROVIDERS = ["simulator", "twilio", "vonage"]
# Each provider's word for "the network has it" (a report that precedes "delivered").
SENT_WORD = {"simulator": "sent", "twilio": "sent", "vonage": "accepted"}
TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "twilio-auth-token-for-tests"
VONAGE_KEY = "vonagekey"
VONAGE_SECRET = "vonagesecret"
# This test run's own secrets: nothing signs with a default the API might also know.
VONAGE_SIGNATURE_SECRET = secrets.token_hex(16)
VONAGE_CALLBACK_TOKEN = secrets.token_urlsafe(24)
SIMULATOR_ACCOUNT_ID = "SA" + secrets.token_hex(16)
SIMULATOR_SECRET = secrets.token_hex(32)


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
            "signature_secret": VONAGE_SIGNATURE_SECRET,
            "signature_method": "sha256",
            "callback_token": VONAGE_CALLBACK_TOKEN,
            "rest_host": f"127.0.0.1:{settings.simulator_tls_port}",
        }
    return {"account_id": SIMULATOR_ACCOUNT_ID, "signing_secret": SIMULATOR_SECRET}


def register_vonage(settings: Settings, credentials: dict[str, Any]) -> None:
    """Tell the simulator the Vonage account's secrets: it then checks the requests' `sig`
    and signs the receipts, as Vonage does for an account with a signature secret."""
    account = {
        "api_key": credentials["api_key"],
        "api_secret": credentials.get("api_secret"),
        "signature_secret": credentials.get("signature_secret"),
        "signature_method": credentials.get("signature_method", "sha256"),
    }
    response = httpx.post(f"{settings.simulator_url}/control/vonage/accounts", json=account)
    response.raise_for_status()


def use_providers(
    db: Database, settings: Settings, providers: list[str], **rates: float
) -> list[int]:
    """Make the demo account send through `providers`, in that priority order (a Vonage
    account is registered with the simulator, which DELETE /messages forgets)."""
    ids = []
    if "vonage" in providers:
        register_vonage(settings, credentials("vonage", settings))
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        session.execute(delete(ProviderAccount).where(ProviderAccount.account_id == account.id))
        for priority, provider in enumerate(providers):
            settings_row = provisioning.set_provider(
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
        key = "not-the-secret" if forged else VONAGE_SIGNATURE_SECRET
        params["sig"] = Auth(
            api_key=VONAGE_KEY, signature_secret=key, signature_method="sha256"
        ).sign_params(dict(params))
        # The receipt URL the adapter gives Vonage: the account's token binds it.
        return Webhook(f"/callbacks/vonage/{VONAGE_CALLBACK_TOKEN}?messageSid={sid}", params, {})
    path = f"/callbacks/simulator?messageSid={sid}"
    body = json.dumps(
        {"id": provider_id, "status": status, "accountId": SIMULATOR_ACCOUNT_ID}
    ).encode()
    url = settings.public_base_url + path
    timestamp = str(int(time.time()))
    signature = sign("not-the-secret" if forged else SIMULATOR_SECRET, timestamp, url, body)
    headers = {
        SIGNATURE_HEADER: signature,
        TIMESTAMP_HEADER: timestamp,
        "Content-Type": "application/json",
    }
    return Webhook(path, {}, headers, content=body)
