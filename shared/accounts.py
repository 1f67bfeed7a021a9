"""Accounts, their application keys, environments and provider settings."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.directory import cached
from shared.errors import InvalidParameter, ProviderNotDefined, Unauthenticated
from shared.models import (
    Account,
    ApplicationKey,
    Campaign,
    Environment,
    ProviderAccount,
    utcnow,
)

SYSTEM_TENANT_ID = "system"


def hash_application_key(key: str) -> str:
    """Keys are 96+ random bits, so a plain SHA-256 is enough and keeps every request fast."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_application_key() -> str:
    """A fresh key in the shape the vendor issues: 24 lowercase hex digits."""
    return secrets.token_hex(12)


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
        lambda: session.scalar(
            select(Account)
            .join(ApplicationKey, ApplicationKey.account_id == Account.id)
            .where(
                Account.tenant_id == tenant_id,
                Account.is_system.is_(False),
                ApplicationKey.key_hash == digest,
                ApplicationKey.revoked_at.is_(None),
            )
        ),
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
        lambda: session.scalar(
            select(Environment).where(
                Environment.account_id == account.id, Environment.name == wanted
            )
        ),
    )
    if environment is None:
        raise InvalidParameter("Environment-Name")
    return environment


def find_campaign(session: Session, environment: Environment, campaign_id: str) -> Campaign | None:
    """A campaign by its public id within one environment."""
    return session.scalar(
        select(Campaign).where(
            Campaign.environment_id == environment.id, Campaign.campaign_id == campaign_id
        )
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
        lambda: session.scalar(select(Account.id).where(Account.is_system.is_(True))) or 0,
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
        lambda: list(
            session.scalars(
                select(ProviderAccount)
                .where(ProviderAccount.account_id == owner_id)
                .order_by(ProviderAccount.priority, ProviderAccount.id)
            )
        ),
    )


def cached_campaign(
    session: Session, environment: Environment, campaign_id: str
) -> Campaign | None:
    """`find_campaign` for the request path: maybe from the cache, so never to be changed."""
    return cached(
        session,
        ("campaign", environment.id, campaign_id),
        lambda: find_campaign(session, environment, campaign_id),
    )


# Provisioning: what the CLI does, so nobody edits the database by hand.


def get_account(session: Session, tenant_id: str) -> Account:
    account = session.scalar(select(Account).where(Account.tenant_id == tenant_id))
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
    session.add(account)
    session.flush()
    add_environment(session, account, default_environment)
    return account


def ensure_account(
    session: Session, tenant_id: str, name: str, default_environment: str = "PROD"
) -> Account:
    existing = session.scalar(select(Account).where(Account.tenant_id == tenant_id))
    return existing or create_account(session, tenant_id, name, default_environment)


def add_environment(session: Session, account: Account, name: str) -> Environment:
    existing = session.scalar(
        select(Environment).where(Environment.account_id == account.id, Environment.name == name)
    )
    if existing is not None:
        return existing
    environment = Environment(account_id=account.id, name=name)
    session.add(environment)
    session.flush()
    return environment


def add_application_key(
    session: Session, account: Account, key: str | None = None, *, revoke_others: bool = False
) -> str:
    """Store a key's hash and return the key itself: the only time it is ever visible."""
    key = key or new_application_key()
    digest = hash_application_key(key)
    if session.scalar(select(ApplicationKey).where(ApplicationKey.key_hash == digest)) is None:
        if revoke_others:
            for old in session.scalars(
                select(ApplicationKey).where(
                    ApplicationKey.account_id == account.id, ApplicationKey.revoked_at.is_(None)
                )
            ):
                old.revoked_at = utcnow()
        session.add(ApplicationKey(account_id=account.id, key_hash=digest, key_prefix=key[:4]))
        session.flush()
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
) -> Campaign:
    campaign = find_campaign(session, environment, campaign_id)
    if campaign is None:
        campaign = Campaign(
            account_id=environment.account_id,
            environment_id=environment.id,
            campaign_id=campaign_id,
        )
        session.add(campaign)
    campaign.name = name
    campaign.message_text = message_text
    campaign.link_url = link_url
    campaign.active = active
    campaign.shorten_links = shorten_links
    campaign.valid_from = valid_from
    campaign.valid_until = valid_until
    session.flush()
    return campaign


# The credential each provider names in its webhooks, kept as the settings' `public_id`.
PUBLIC_ID_CREDENTIAL = {"twilio": "account_sid", "vonage": "api_key", "simulator": "account_id"}
# Vonage receipts are unsigned in most real accounts: the path of the URL we give for them
# carries this secret instead (shared/providers/vonage.py), one per provider account.
CALLBACK_TOKEN = "callback_token"  # noqa: S105 (the name of a credential, not one)
PREVIOUS_CALLBACK_TOKENS = "previous_callback_tokens"


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
    existing = session.scalar(
        select(ProviderAccount).where(
            ProviderAccount.account_id == account.id,
            ProviderAccount.provider == provider,
            ProviderAccount.priority == priority,
        )
    )
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
    if existing is None:
        session.add(settings)
    session.flush()
    return settings


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
    session.flush()
    return token


def callback_tokens(credentials: dict[str, Any]) -> list[str]:
    """The callback tokens a provider account accepts now: its current one and the last."""
    current = credentials.get(CALLBACK_TOKEN)
    previous = credentials.get(PREVIOUS_CALLBACK_TOKENS) or []
    return [str(token) for token in ([current] if current else []) + list(previous) if token]


def provider_accounts_named(
    session: Session, provider: str, public_id: str | None
) -> list[ProviderAccount]:
    """The settings whose public id (AccountSid, api-key, account id) a webhook names.

    Several tenants may hold settings of one provider account; the webhook's signature
    decides which of them, if any, it really comes from."""
    if not public_id:
        return []
    return list(
        session.scalars(
            select(ProviderAccount)
            .where(ProviderAccount.provider == provider, ProviderAccount.public_id == public_id)
            .order_by(ProviderAccount.id)
        )
    )
