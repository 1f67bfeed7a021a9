"""Who a request acts for: the account behind a Tenant-Id and Application-Key, its environment,
its campaigns and the provider settings a send or a webhook uses.

These lookups run on every request, so they go through the config cache
(`shared.core.config_cache`); the SQL itself is in `shared.accounts.queries`."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.accounts import queries
from shared.core.config_cache import cached
from shared.core.errors import InvalidParameter, ProviderNotDefined, Unauthenticated
from shared.core.models import Account, Campaign, Environment, ProviderAccount

SYSTEM_TENANT_ID = "system"

# The credential each provider names in its webhooks, kept as the settings' `public_id`.
PUBLIC_ID_CREDENTIAL = {"twilio": "account_sid", "vonage": "api_key", "simulator": "account_id"}
# Vonage receipts are unsigned in most real accounts: the path of the URL we give for them
# carries this secret instead (shared/providers/vonage.py), one per provider account.
CALLBACK_TOKEN = "callback_token"  # noqa: S105 (the name of a credential, not one)
PREVIOUS_CALLBACK_TOKENS = "previous_callback_tokens"


def hash_application_key(key: str) -> str:
    """Keys are 96+ random bits, so a plain SHA-256 is enough and keeps every request fast."""
    return hashlib.sha256(key.encode()).hexdigest()


def authenticate(
    session: Session, account_in_url: str, tenant_id: str | None, application_key: str | None
) -> Account:
    """The account the request may act for; no key ever reaches another account's data."""
    if not tenant_id:
        raise Unauthenticated("Missing Tenant-Id header")
    if not application_key:
        raise Unauthenticated("Missing Application-Key header")
    if tenant_id != account_in_url:
        raise Unauthenticated("Tenant-Id does not match the account in the URL")
    digest = hash_application_key(application_key)
    account = cached(
        session,
        ("account", tenant_id, digest),
        lambda: queries.account_for_key(session, tenant_id, digest),
    )
    # One answer for "no such tenant" and "wrong key" so tenants cannot be enumerated.
    # Comparing digests in SQL leaks nothing useful: the caller cannot steer the hash.
    if account is None:
        raise Unauthenticated("Wrong credentials")
    return account


def resolve_environment(session: Session, account: Account, name: str | None) -> Environment:
    """The environment a request names, or the account's default when it names none."""
    wanted = name if name else account.default_environment
    environment = cached(
        session,
        ("environment", account.id, wanted),
        lambda: queries.environment_named(session, account.id, wanted),
    )
    if environment is None:
        raise InvalidParameter("Environment-Name")
    return environment


def find_campaign(session: Session, environment: Environment, campaign_id: str) -> Campaign | None:
    """A campaign by its public id within one environment."""
    return queries.campaign_by_id(session, environment.id, campaign_id)


def cached_campaign(
    session: Session, environment: Environment, campaign_id: str
) -> Campaign | None:
    """`find_campaign` for the request path: maybe from the cache, so never to be changed."""
    return cached(
        session,
        ("campaign", environment.id, campaign_id),
        lambda: find_campaign(session, environment, campaign_id),
    )


def resolve_provider_account(
    session: Session, account: Account, now: datetime, *, from_system: bool = False
) -> ProviderAccount:
    """The provider settings a send uses: the account's own, else the system account's."""
    owners = [account.id] if not from_system else []
    system_id = cached(
        session,
        ("system-account",),
        # 0 (never an id) for "there is none", which is worth remembering too.
        lambda: queries.system_account_id(session) or 0,
    )
    if system_id:
        owners.append(system_id)
    for owner in owners:
        candidates = provider_accounts_of(session, owner)
        if not candidates:
            continue
        usable = [c for c in candidates if c.expires_at is None or c.expires_at > now]
        if not usable:
            # Settings exist but lapsed: the seed's "expired" row, not a silent fallback.
            raise ProviderNotDefined("provider settings expired")
        return usable[0]
    raise ProviderNotDefined("no provider settings")


def provider_accounts_of(session: Session, owner_id: int) -> list[ProviderAccount]:
    """An account's provider settings, in the order they are tried."""
    return cached(
        session,
        ("provider-accounts", owner_id),
        lambda: queries.provider_accounts_of(session, owner_id),
    )


def provider_accounts_named(
    session: Session, provider: str, public_id: str | None
) -> list[ProviderAccount]:
    """The settings whose public id (AccountSid, api-key, account id) a webhook names.

    Several tenants may hold settings of one provider account; the webhook's signature
    decides which of them, if any, it really comes from."""
    if not public_id:
        return []
    return queries.provider_accounts_with_public_id(session, provider, public_id)


def callback_tokens(credentials: dict[str, Any]) -> list[str]:
    """The callback tokens a provider account accepts now: its current one and the last."""
    current = credentials.get(CALLBACK_TOKEN)
    previous = credentials.get(PREVIOUS_CALLBACK_TOKENS) or []
    return [str(token) for token in ([current] if current else []) + list(previous) if token]
