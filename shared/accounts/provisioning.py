"""Provisioning: accounts, application keys, environments, campaigns and provider settings,
created and changed as the CLI asks, so nobody edits the database by hand; and the secrets we
issue ourselves (keys, the simulator's account, Vonage callback tokens)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from shared.accounts import queries
from shared.accounts.access import (
    CALLBACK_TOKEN,
    PREVIOUS_CALLBACK_TOKENS,
    PUBLIC_ID_CREDENTIAL,
    SYSTEM_TENANT_ID,
    hash_application_key,
)
from shared.core.models import (
    Account,
    ApplicationKey,
    Campaign,
    Environment,
    ProviderAccount,
    utcnow,
)
from shared.text.quiet_hours import parse_quiet_hours


def new_application_key() -> str:
    """A fresh key in the shape the vendor issues: 24 lowercase hex digits."""
    return secrets.token_hex(12)


def get_account(session: Session, tenant_id: str) -> Account:
    """The tenant's account; LookupError (one line in the CLI) when there is none."""
    account = queries.account_by_tenant(session, tenant_id)
    if account is None:
        raise LookupError(f"no account {tenant_id!r}")
    return account


def create_account(
    session: Session, tenant_id: str, name: str, default_environment: str = "PROD"
) -> Account:
    """A new account with its default environment (its key comes from `add_application_key`)."""
    account = Account(
        tenant_id=tenant_id,
        name=name,
        default_environment=default_environment,
        is_system=tenant_id == SYSTEM_TENANT_ID,
    )
    queries.save(session, account)
    add_environment(session, account, default_environment)
    return account


def ensure_account(
    session: Session, tenant_id: str, name: str, default_environment: str = "PROD"
) -> Account:
    """The tenant's account, created as `create_account` does when there is none yet."""
    existing = queries.account_by_tenant(session, tenant_id)
    return existing or create_account(session, tenant_id, name, default_environment)


def add_environment(session: Session, account: Account, name: str) -> Environment:
    """The account's environment of this name, created when it has none."""
    existing = queries.environment_named(session, account.id, name)
    if existing is not None:
        return existing
    environment = Environment(account_id=account.id, name=name)
    queries.save(session, environment)
    return environment


def set_default_environment(session: Session, account: Account, name: str) -> None:
    """The environment a request uses when it names none."""
    account.default_environment = name
    queries.save(session, account)


def add_application_key(
    session: Session, account: Account, key: str | None = None, *, revoke_others: bool = False
) -> str:
    """Store a key's hash and return the key itself: the only time it is ever visible."""
    key = key or new_application_key()
    digest = hash_application_key(key)
    if queries.application_key_by_hash(session, digest) is None:
        if revoke_others:
            queries.revoke_application_keys(session, account.id, utcnow())
        queries.save(
            session, ApplicationKey(account_id=account.id, key_hash=digest, key_prefix=key[:4])
        )
    return key


def upsert_campaign(
    session: Session,
    environment: Environment,
    campaign_id: str,
    *,
    name: str,
    message_text: str,
    link_url: str | None,
    active: bool = True,
    shorten_links: bool = False,
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
    quiet_hours: str | None = None,
    status_callback: str | None = None,
) -> Campaign:
    """Create or update a campaign of one environment (`quiet_hours`: "HH:MM-HH:MM")."""
    if quiet_hours is not None:
        parse_quiet_hours(quiet_hours)  # refused here, never found wrong by the pump
    campaign = queries.campaign_by_id(session, environment.id, campaign_id)
    if campaign is None:
        campaign = Campaign(
            account_id=environment.account_id,
            environment_id=environment.id,
            campaign_id=campaign_id,
        )
    campaign.name = name
    campaign.message_text = message_text
    campaign.link_url = link_url
    campaign.active = active
    campaign.shorten_links = shorten_links
    campaign.valid_from = valid_from
    campaign.valid_until = valid_until
    campaign.quiet_hours = quiet_hours.strip() if quiet_hours else None
    campaign.status_callback = status_callback
    queries.save(session, campaign)
    return campaign


def set_provider(
    session: Session,
    account: Account,
    provider: str,
    *,
    sender_ids: list[str],
    credentials: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
    priority: int = 0,
) -> ProviderAccount:
    """Create or replace the account's settings for one provider at one priority.

    Secrets we issue ourselves (the simulator's account, the Vonage callback token) are
    generated here when not given, so none of them has a default anyone could know."""
    existing = queries.provider_account_at(session, account.id, provider, priority)
    settings = existing or ProviderAccount(
        account_id=account.id, provider=provider, priority=priority
    )
    settings.sender_ids = list(sender_ids)
    settings.credentials = _with_issued_secrets(
        provider, dict(credentials or {}), dict(existing.credentials or {}) if existing else {}
    )
    credential = PUBLIC_ID_CREDENTIAL.get(provider)
    public_id = settings.credentials.get(credential) if credential else None
    settings.public_id = str(public_id) if public_id else None
    settings.expires_at = expires_at
    queries.save(session, settings)
    return settings


def set_provider_rates(
    session: Session,
    settings: ProviderAccount,
    *,
    sender_rate: float | None,
    account_rate: float | None,
) -> None:
    """Segments per second per sender number and for the whole settings (None: no limit)."""
    settings.sender_rate = sender_rate
    settings.account_rate = account_rate
    queries.save(session, settings)


def find_provider(
    session: Session, account: Account, provider: str, priority: int
) -> ProviderAccount | None:
    """The account's settings for one provider at one priority, if it has them."""
    return queries.provider_account_at(session, account.id, provider, priority)


def has_provider(session: Session, account: Account) -> bool:
    """Whether the account has settings for any provider at all."""
    return queries.has_provider_accounts(session, account.id)


def _with_issued_secrets(
    provider: str, credentials: dict[str, Any], before: dict[str, Any]
) -> dict[str, Any]:
    # Replacing settings keeps what we issued (messages in flight are verified with it).
    issuers: dict[str, dict[str, Callable[[], str]]] = {
        "simulator": {
            "account_id": lambda: "SA" + secrets.token_hex(16),
            "signing_secret": lambda: secrets.token_urlsafe(32),
        },
        "vonage": {CALLBACK_TOKEN: new_callback_token},
    }
    for key, make in issuers.get(provider, {}).items():
        if not credentials.get(key):
            credentials[key] = before.get(key) or make()
    if provider == "vonage" and before.get(PREVIOUS_CALLBACK_TOKENS):
        credentials.setdefault(PREVIOUS_CALLBACK_TOKENS, before[PREVIOUS_CALLBACK_TOKENS])
    return credentials


def new_callback_token() -> str:
    """A secret for a callback URL's path: URL-safe, 192 bits, short enough for Vonage's
    100-character callback limit."""
    return secrets.token_urlsafe(24)


def rotate_callback_token(session: Session, settings: ProviderAccount) -> str:
    """Issue a new callback token; the one it replaces stays valid until the next rotation,
    so receipts of messages already sent with it still arrive."""
    credentials = dict(settings.credentials or {})
    if old := credentials.get(CALLBACK_TOKEN):
        credentials[PREVIOUS_CALLBACK_TOKENS] = [old]
    token = new_callback_token()
    credentials[CALLBACK_TOKEN] = token
    settings.credentials = credentials
    queries.save(session, settings)
    return token
