"""Every SQL statement about deflected calls: their jpTokens, short links and the clicks on
them, and the reads behind the message lookup and the Deflected Call Report. `tokens`, `links`
and `reports` decide, this module reads and writes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from shared.core.models import (
    DeflectedCall,
    DeliveryEvent,
    InteractionToken,
    Message,
    ShortLink,
    StatusCallback,
    StatusCallbackAttempt,
    table_of,
)

# Tokens


def token_taken(session: Session, account_id: int, token: str) -> bool:
    """Whether the account already has this token (tokens are unique per account)."""
    return bool(
        session.scalar(
            select(InteractionToken.id).where(
                InteractionToken.account_id == account_id, InteractionToken.token == token
            )
        )
    )


def add_token(session: Session, token: InteractionToken) -> None:
    """A new token, written at once: its call's deflection record needs its id."""
    session.add(token)
    session.flush()


def add_deflected_call(session: Session, call: DeflectedCall) -> None:
    session.add(call)


_tokens = table_of(InteractionToken)
# Built once: constructing and hashing a statement costs more CPU than running it.
_FIND_TOKEN = select(_tokens.c.id, _tokens.c.token, _tokens.c.expires_at).where(
    _tokens.c.account_id == bindparam("account_id"),
    _tokens.c.environment_id == bindparam("environment_id"),
    _tokens.c.token == bindparam("token"),
)


def token_in(
    session: Session, account_id: int, environment_id: int, token: str
) -> Row[int, str, datetime] | None:
    """The token's `id`, `token` and `expires_at` in this account and environment, if any."""
    return (
        session.connection()
        .execute(
            _FIND_TOKEN,
            {"account_id": account_id, "environment_id": environment_id, "token": token},
        )
        .first()
    )


_FIND_TOKENS = select(
    _tokens.c.id,
    _tokens.c.token,
    _tokens.c.expires_at,
    _tokens.c.account_id,
    _tokens.c.environment_id,
).where(_tokens.c.token.in_(bindparam("tokens", expanding=True)))


# `tokens_named` as plain SQL for psycopg's own connection (shared/messages/group_sql.py).
TOKENS_NAMED_SQL = (
    "SELECT id, token, expires_at, account_id, environment_id"
    " FROM interaction_tokens WHERE token = ANY(%s::text[])"
)


def tokens_named(session: Session, tokens: Sequence[str]) -> Sequence[Any]:
    """Every token with one of these values, in whichever account (the caller filters)."""
    return session.connection().execute(_FIND_TOKENS, {"tokens": list(tokens)}).all()


# Short links


def short_link(session: Session, code: str) -> ShortLink | None:
    return session.get(ShortLink, code)


def add_short_link(session: Session, link: ShortLink) -> None:
    session.add(link)


def delete_short_link(session: Session, code: str) -> None:
    session.execute(delete(ShortLink).where(ShortLink.code == code))


def count_click(session: Session, code: str, now: datetime) -> None:
    """One more click on a short link."""
    session.execute(
        update(ShortLink)
        .where(ShortLink.code == code)
        .values(
            clicks=ShortLink.clicks + 1,
            first_clicked_at=func.coalesce(ShortLink.first_clicked_at, now),
            last_clicked_at=now,
        )
    )


def count_call_click(session: Session, token_id: int, now: datetime) -> None:
    """One more click on the call's record (the report's linkClicks)."""
    session.execute(
        update(DeflectedCall)
        .where(DeflectedCall.token_id == token_id)
        .values(
            link_clicks=DeflectedCall.link_clicks + 1,
            link_first_clicked_at=func.coalesce(DeflectedCall.link_first_clicked_at, now),
        )
    )


# Reports


def message_of_account(session: Session, account_id: int, sid: str) -> Message | None:
    return session.scalar(
        select(Message).where(Message.sid == sid, Message.account_id == account_id)
    )


def status_callbacks_of(
    session: Session, sid: str
) -> list[tuple[StatusCallback, list[StatusCallbackAttempt]]]:
    """A message's status callbacks, oldest first, each with its attempts in order."""
    callbacks = list(
        session.scalars(
            select(StatusCallback)
            .where(StatusCallback.message_sid == sid)
            .order_by(StatusCallback.id)
        )
    )
    attempts: dict[int, list[StatusCallbackAttempt]] = {c.id: [] for c in callbacks}
    if callbacks:
        for attempt in session.scalars(
            select(StatusCallbackAttempt)
            .where(StatusCallbackAttempt.callback_id.in_(attempts))
            .order_by(StatusCallbackAttempt.id)
        ):
            attempts[attempt.callback_id].append(attempt)
    return [(callback, attempts[callback.id]) for callback in callbacks]


def events_of(session: Session, sid: str) -> list[DeliveryEvent]:
    """A message's delivery events, oldest first."""
    return list(
        session.scalars(
            select(DeliveryEvent)
            .where(DeliveryEvent.message_sid == sid)
            .order_by(DeliveryEvent.created_at, DeliveryEvent.id)
        )
    )


def deflected_call_rows(
    session: Session, account_id: int, since: datetime, until: datetime, limit: int
) -> Sequence[Row[DeflectedCall, str, str, str | None, datetime | None]]:
    """The account's calls whose token was issued in [since, until), oldest first, each with
    its token, caller, and its latest SMS's status and reconciliation time (None without)."""
    return session.execute(
        select(
            DeflectedCall,
            InteractionToken.token,
            InteractionToken.caller,
            Message.status,
            Message.reconciled_at,
        )
        .join(InteractionToken, InteractionToken.id == DeflectedCall.token_id)
        .outerjoin(Message, Message.sid == DeflectedCall.last_message_sid)
        .where(
            DeflectedCall.account_id == account_id,
            DeflectedCall.token_issued_at >= since,
            DeflectedCall.token_issued_at < until,
        )
        .order_by(DeflectedCall.token_issued_at, DeflectedCall.token_id)
        .limit(limit)
    ).all()
