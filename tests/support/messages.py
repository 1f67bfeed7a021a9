"""Messages made through the real accept path for the demo account, read back in fresh
sessions so no identity-map copy hides what the database holds."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from shared.accounts import access, provisioning
from shared.calls.tokens import issue_token
from shared.core.db import Database
from shared.core.models import DeflectedCall, DeliveryEvent, Message
from shared.core.settings import Settings
from shared.messages.accept import SendSmsCommand, accept_send
from tests.support.data import CALLER, KEY, TENANT


def accept_message(
    db: Database,
    settings: Settings,
    now: datetime,
    *,
    with_token: bool = True,
    jp_token: str | None = None,
    status_callback: str | None = None,
) -> str:
    """A message for the demo account's campaign1, accepted at `now`; returns its sid.

    With `jp_token` the message belongs to that call; otherwise a new call's token is issued."""
    with db.transaction() as session:
        if with_token and jp_token is None:
            account = provisioning.get_account(session, TENANT)
            environment = access.resolve_environment(session, account, None)
            jp_token = issue_token(
                session, account, environment, CALLER, settings.token_lifetime, now
            ).token
        accepted = accept_send(
            session,
            SendSmsCommand(
                account_in_url=TENANT,
                tenant_id=TENANT,
                application_key=KEY,
                environment_name=None,
                campaign_id="campaign1",
                caller_id=CALLER,
                jp_token=jp_token,
                require_token=with_token,
                status_callback=status_callback,
            ),
            settings,
            now,
        )
        return accepted.sid


def load_message(db: Database, sid: str) -> Message:
    with db.transaction() as session:
        message = session.get(Message, sid)
        assert message is not None, sid
        return message


def load_events(db: Database, sid: str | None) -> list[DeliveryEvent]:
    """The events of one message, or with None the unmatched ones, oldest first."""
    condition = (
        DeliveryEvent.message_sid.is_(None) if sid is None else DeliveryEvent.message_sid == sid
    )
    with db.transaction() as session:
        return list(
            session.scalars(select(DeliveryEvent).where(condition).order_by(DeliveryEvent.id))
        )


def count_events(db: Database) -> int:
    with db.transaction() as session:
        return len(session.scalars(select(DeliveryEvent.id)).all())


def load_deflected_call(db: Database, sid: str) -> DeflectedCall:
    """The Deflected Call Report row of the token the message was sent with."""
    with db.transaction() as session:
        token_id = session.scalar(select(Message.token_id).where(Message.sid == sid))
        assert token_id is not None, "message was accepted without a token"
        row = session.get(DeflectedCall, token_id)
        assert row is not None
        return row
