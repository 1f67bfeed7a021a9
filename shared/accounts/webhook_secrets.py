"""Accounts' webhook secrets: the keys status callbacks are signed with.

A secret is stored as itself (a callback is signed with it, so a hash would not do) and only
ever shown to the operator (`sms-dispatch account webhook-secret`). Rotating retires the
current one; for SMSD_WEBHOOK_SECRET_OVERLAP afterwards a callback carries a signature by
each, so a receiver can switch to the new secret whenever it likes within that time."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.core.models import WebhookSecret

PREFIX = "whsec_"


def new_webhook_secret() -> str:
    """`whsec_` and 43 URL-safe characters (256 random bits)."""
    return PREFIX + secrets.token_urlsafe(32)


def current_secret(session: Session, account_id: int, now: datetime) -> str:
    """The account's signing secret, made now if it has none yet (a concurrent maker's wins:
    one current secret per account, uq_webhook_secrets_current)."""
    found = _current(session, account_id)
    if found is not None:
        return found
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(WebhookSecret)
        .values(account_id=account_id, secret=new_webhook_secret(), created_at=now)
        .on_conflict_do_nothing(
            index_elements=["account_id"], index_where=WebhookSecret.retired_at.is_(None)
        )
    )
    made = _current(session, account_id)
    assert made is not None, "a current webhook secret was just made"
    return made


def _current(session: Session, account_id: int) -> str | None:
    return session.scalars(
        select(WebhookSecret.secret).where(
            WebhookSecret.account_id == account_id, WebhookSecret.retired_at.is_(None)
        )
    ).first()


def rotate_secret(session: Session, account_id: int, now: datetime) -> str:
    """A new signing secret; the ones before it sign too until the overlap ends."""
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.account_id == account_id, WebhookSecret.retired_at.is_(None))
        .values(retired_at=now)
    )
    secret = new_webhook_secret()
    session.add(WebhookSecret(account_id=account_id, secret=secret, created_at=now))
    session.flush()
    return secret


def signing_secrets(
    session: Session, account_ids: set[int], now: datetime, overlap: timedelta
) -> dict[int, list[str]]:
    """Each account's secrets that sign now, the current first; an account with none is
    given one (the operator reads it with the CLI)."""
    rows = session.execute(
        select(WebhookSecret.account_id, WebhookSecret.secret)
        .where(
            WebhookSecret.account_id.in_(account_ids),
            (WebhookSecret.retired_at.is_(None)) | (WebhookSecret.retired_at > now - overlap),
        )
        .order_by(
            WebhookSecret.account_id,
            WebhookSecret.retired_at.is_not(None),
            WebhookSecret.created_at.desc(),
            WebhookSecret.id.desc(),
        )
    )
    found: dict[int, list[str]] = {}
    for account_id, secret in rows:
        found.setdefault(account_id, []).append(secret)
    for account_id in account_ids - found.keys():
        found[account_id] = [current_secret(session, account_id, now)]
    return found
