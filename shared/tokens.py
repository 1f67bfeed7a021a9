"""generateToken: the per-call `jpToken` and the deflection record it opens."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Account, DeflectedCall, Environment, InteractionToken

TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 7  # the vendor's examples (`Aejhib7`) are 7 letters and digits


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    caller: str
    issued_at: datetime
    expires_at: datetime


def _new_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def issue_token(
    session: Session,
    account: Account,
    environment: Environment,
    caller: str,
    lifetime: timedelta,
    now: datetime,
) -> IssuedToken:
    """A fresh token unique within the account, and the call's (empty) deflection record."""
    token = _new_token()
    while session.scalar(
        select(InteractionToken.id).where(
            InteractionToken.account_id == account.id, InteractionToken.token == token
        )
    ):
        token = _new_token()
    row = InteractionToken(
        account_id=account.id,
        environment_id=environment.id,
        token=token,
        caller=caller,
        issued_at=now,
        expires_at=now + lifetime,
    )
    session.add(row)
    session.flush()
    session.add(DeflectedCall(token_id=row.id, account_id=account.id, token_issued_at=now))
    return IssuedToken(token=token, caller=caller, issued_at=now, expires_at=row.expires_at)


def find_token(
    session: Session, account_id: int, environment_id: int, token: str
) -> InteractionToken | None:
    """A token of this account and environment: a DEV call's token never reaches PROD."""
    return session.scalar(
        select(InteractionToken).where(
            InteractionToken.account_id == account_id,
            InteractionToken.environment_id == environment_id,
            InteractionToken.token == token,
        )
    )
