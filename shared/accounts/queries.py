"""Every SQL statement about accounts, their application keys, environments, campaigns and
provider settings: `access` and `provisioning` decide, this module reads and writes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.core.models import Account, ApplicationKey, Campaign, Environment, ProviderAccount

# Accounts and their keys


def account_for_key(session: Session, tenant_id: str, key_hash: str) -> Account | None:
    """The tenant's (non-system) account if it holds this live key's hash."""
    return session.scalar(
        select(Account)
        .join(ApplicationKey, ApplicationKey.account_id == Account.id)
        .where(
            Account.tenant_id == tenant_id,
            Account.is_system.is_(False),
            ApplicationKey.key_hash == key_hash,
            ApplicationKey.revoked_at.is_(None),
        )
    )


def account_by_tenant(session: Session, tenant_id: str) -> Account | None:
    return session.scalar(select(Account).where(Account.tenant_id == tenant_id))


def system_account_id(session: Session) -> int | None:
    return session.scalar(select(Account.id).where(Account.is_system.is_(True)))


def application_key_by_hash(session: Session, key_hash: str) -> ApplicationKey | None:
    return session.scalar(select(ApplicationKey).where(ApplicationKey.key_hash == key_hash))


def revoke_application_keys(session: Session, account_id: int, at: datetime) -> None:
    """Revoke every key of the account still live."""
    for key in session.scalars(
        select(ApplicationKey).where(
            ApplicationKey.account_id == account_id, ApplicationKey.revoked_at.is_(None)
        )
    ):
        key.revoked_at = at


# Environments and campaigns


def environment_named(session: Session, account_id: int, name: str) -> Environment | None:
    return session.scalar(
        select(Environment).where(Environment.account_id == account_id, Environment.name == name)
    )


def campaign_by_id(session: Session, environment_id: int, campaign_id: str) -> Campaign | None:
    """A campaign by its public id within one environment."""
    return session.scalar(
        select(Campaign).where(
            Campaign.environment_id == environment_id, Campaign.campaign_id == campaign_id
        )
    )


# Provider settings


def provider_accounts_of(session: Session, account_id: int) -> list[ProviderAccount]:
    """An account's provider settings, in the order they are tried."""
    return list(
        session.scalars(
            select(ProviderAccount)
            .where(ProviderAccount.account_id == account_id)
            .order_by(ProviderAccount.priority, ProviderAccount.id)
        )
    )


def provider_account_at(
    session: Session, account_id: int, provider: str, priority: int
) -> ProviderAccount | None:
    """An account's settings for one provider at one priority (there is at most one)."""
    return session.scalar(
        select(ProviderAccount).where(
            ProviderAccount.account_id == account_id,
            ProviderAccount.provider == provider,
            ProviderAccount.priority == priority,
        )
    )


def has_provider_accounts(session: Session, account_id: int) -> bool:
    return bool(
        session.scalar(select(ProviderAccount.id).where(ProviderAccount.account_id == account_id))
    )


def provider_accounts_with_public_id(
    session: Session, provider: str, public_id: str
) -> list[ProviderAccount]:
    return list(
        session.scalars(
            select(ProviderAccount)
            .where(ProviderAccount.provider == provider, ProviderAccount.public_id == public_id)
            .order_by(ProviderAccount.id)
        )
    )


# Writes


def save(
    session: Session, row: Account | ApplicationKey | Campaign | Environment | ProviderAccount
) -> None:
    """Write a new or changed row now, so its id is known and a duplicate fails here."""
    session.add(row)
    session.flush()
