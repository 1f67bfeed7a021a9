"""generateToken: the per-call `jpToken` and the deflection record it opens."""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from shared.calls import queries
from shared.core.models import Account, DeflectedCall, Environment, InteractionToken

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
    while queries.token_taken(session, account.id, token):
        token = _new_token()
    row = InteractionToken(
        account_id=account.id,
        environment_id=environment.id,
        token=token,
        caller=caller,
        issued_at=now,
        expires_at=now + lifetime,
    )
    queries.add_token(session, row)
    queries.add_deflected_call(
        session, DeflectedCall(token_id=row.id, account_id=account.id, token_issued_at=now)
    )
    return IssuedToken(token=token, caller=caller, issued_at=now, expires_at=row.expires_at)


@dataclass(frozen=True, slots=True)
class TokenRef:
    """What a request needs of a stored token."""

    id: int
    token: str
    expires_at: datetime


def find_token(
    session: Session, account_id: int, environment_id: int, token: str
) -> TokenRef | None:
    """A token of this account and environment: a DEV call's token never reaches PROD."""
    row = queries.token_in(session, account_id, environment_id, token)
    return TokenRef(row.id, row.token, row.expires_at) if row is not None else None


def find_tokens(
    session: Session, wanted: Sequence[tuple[int, int, str]]
) -> dict[tuple[int, int, str], TokenRef]:
    """`find_token` for many requests in one query: by (account, environment, token)."""
    if not wanted:
        return {}
    keys = set(wanted)
    rows = queries.tokens_named(session, sorted({token for _, _, token in keys}))
    found: dict[tuple[int, int, str], TokenRef] = {}
    for row in rows:
        key = (row.account_id, row.environment_id, row.token)
        if key in keys:
            found[key] = TokenRef(row.id, row.token, row.expires_at)
    return found
