"""Opt-out: a recipient who texts STOP to one of our senders gets nothing more from it."""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.messages import queries

log = structlog.get_logger(__name__)

# The keywords carriers and Twilio honour (see REFERENCE): one of these as the first word.
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "END", "QUIT", "REVOKE", "OPTOUT", "CANCEL"}
)
START_WORDS = frozenset({"START", "UNSTOP"})


def keyword(text: str) -> str:
    """The first word, upper-cased and without punctuation: 'Stop.' is STOP."""
    first = text.strip().split(maxsplit=1)[0] if text.strip() else ""
    return "".join(ch for ch in first if ch.isalnum()).upper()


def handle_inbound(
    session: Session, owner_id: int, sender: str, recipient: str, text: str, now: datetime
) -> str | None:
    """Apply an inbound SMS from `recipient` to our `sender`: 'opted_out', 'opted_in' or None."""
    word = keyword(text)
    if word in STOP_WORDS:
        try:
            with session.begin_nested():
                queries.add_opt_out_row(session, owner_id, sender, recipient, word, now)
        except IntegrityError:
            pass  # already opted out: a second STOP changes nothing
        log.info("optout.added", sender=sender, recipient=recipient, keyword=word)
        return "opted_out"
    if word in START_WORDS:
        queries.delete_opt_out(session, owner_id, sender, recipient)
        log.info("optout.removed", sender=sender, recipient=recipient, keyword=word)
        return "opted_in"
    return None


def is_opted_out(session: Session, owner_id: int, sender: str, recipient: str) -> bool:
    return queries.opt_out_exists(session, owner_id, sender, recipient)


def add_opt_out(
    session: Session, owner_id: int, sender: str, recipient: str, now: datetime
) -> None:
    """The provider told us the recipient unsubscribed (e.g. Twilio 21610): remember it."""
    handle_inbound(session, owner_id, sender, recipient, "STOP", now)
