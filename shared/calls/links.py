"""Campaign links: Get Interaction Link, short links (`/l/<code>`) and the clicks on them."""

from __future__ import annotations

import secrets
import string
from datetime import datetime

from sqlalchemy.orm import Session

from shared.calls import queries
from shared.core.errors import InvalidParameter
from shared.core.models import ShortLink
from shared.core.settings import Settings
from shared.text.rendering import build_link

SHORT_PATH = "/l/"
CODE_ALPHABET = string.ascii_letters + string.digits
_CODE_CHARACTERS = frozenset(CODE_ALPHABET)
CODE_LENGTH = 8  # 62**8 ≈ 2e14: unguessable enough for links that only redirect


def short_url(settings: Settings, code: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}{SHORT_PATH}{code}"


def shorten(
    session: Session,
    account_id: int,
    target_url: str,
    token_id: int | None,
    settings: Settings,
    now: datetime,
    *,
    sent_at: datetime | None = None,
) -> str:
    """A new short link to `target_url` (tied to the call when there is one); its public URL.
    It lives SMSD_SHORT_LINK_LIFETIME from when its text is sent (`sent_at`: a scheduled
    send's time), not from when it was made."""
    while True:
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        if queries.short_link(session, code) is None:
            break
    queries.add_short_link(
        session,
        ShortLink(
            code=code,
            account_id=account_id,
            target_url=target_url,
            token_id=token_id,
            created_at=now,
            expires_at=max(now, sent_at or now) + settings.short_link_lifetime,
        ),
    )
    return short_url(settings, code)


def interaction_link(
    session: Session,
    account_id: int,
    link_url: str | None,
    params: list[tuple[str, str]],
    shorten_it: bool,
    settings: Settings,
    now: datetime,
) -> str:
    """The link a caller's own gateway should send: no call token, since none was given."""
    if not link_url:
        raise InvalidParameter("campaignId")  # a campaign without a link has none to give
    link = build_link(link_url, params, None)
    return shorten(session, account_id, link, None, settings, now) if shorten_it else link


def follow(session: Session, code: str, now: datetime) -> str | None:
    """Where `/l/<code>` leads, counting the click (and on the call's record); None if unknown."""
    if len(code) != CODE_LENGTH or not set(code) <= _CODE_CHARACTERS:
        return None  # not a code we could have made: no need to ask the database
    link = queries.short_link(session, code)
    if link is None or link.expires_at <= now:
        return None
    queries.count_click(session, code, now)
    if link.token_id is not None:
        queries.count_call_click(session, link.token_id, now)
    return link.target_url


def drop_short_link(session: Session, short: str) -> None:
    """Take back a short link made for a message that was not recorded after all."""
    queries.delete_short_link(session, short.rstrip("/").rsplit("/", 1)[-1])
