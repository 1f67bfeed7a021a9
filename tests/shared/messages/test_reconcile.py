"""The reconciler's side of a message: which messages went quiet, and what asking (or giving
up on) the provider does to them, at a `now` the test chooses."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from shared.accounts import provisioning
from shared.calls.reports import deflected_calls
from shared.core.db import Database
from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.messages.claims import (
    claim,
    record_accepted,
    record_in_doubt,
)
from shared.messages.reconcile import record_reconciled, silent_messages
from shared.providers.interface import InDoubtProviderError
from tests.support.data import TENANT, Demo
from tests.support.messages import accept_message, load_events, load_message

TICK = timedelta(milliseconds=1)


@pytest.fixture
def sent(db: Database, demo: Demo, settings: Settings, t0: datetime) -> str:
    sid = accept_message(db, settings, t0)
    with db.transaction() as session:
        owned = claim(session, sid, settings, t0)
        assert owned is not None
        record_accepted(session, owned, "SIM-1", "queued", t0)
    return sid


@pytest.fixture
def in_doubt(db: Database, demo: Demo, settings: Settings, t0: datetime) -> str:
    sid = accept_message(db, settings, t0)
    with db.transaction() as session:
        owned = claim(session, sid, settings, t0)
        assert owned is not None
        record_in_doubt(session, owned, InDoubtProviderError("timeout", "read timed out"), t0)
    return sid


def silent(db: Database, settings: Settings, now: datetime) -> list[str]:
    with db.transaction() as session:
        return [m.sid for m in silent_messages(session, settings, now)]


def reconcile(
    db: Database, settings: Settings, now: datetime, status: MessageStatus | None
) -> MessageStatus | None:
    with db.transaction() as session:
        (message,) = silent_messages(session, settings, now)
        return record_reconciled(session, message, status, None, settings, now)


def test_a_sent_message_is_not_silent_before_reconcile_after(
    db: Database, sent: str, settings: Settings, t0: datetime
) -> None:
    assert silent(db, settings, t0 + settings.reconcile_after - TICK) == []


def test_a_sent_message_is_silent_after_reconcile_after(
    db: Database, sent: str, settings: Settings, t0: datetime
) -> None:
    assert silent(db, settings, t0 + settings.reconcile_after) == [sent]


def test_what_the_provider_says_is_applied_as_a_reconcile_event(
    db: Database, sent: str, settings: Settings, t0: datetime
) -> None:
    now = t0 + settings.reconcile_after
    assert reconcile(db, settings, now, MessageStatus.DELIVERED) is MessageStatus.DELIVERED
    assert load_message(db, sent).status == "delivered"
    assert load_events(db, sent)[-1].source == "reconcile"


def test_a_message_asked_about_is_not_asked_again_before_reconcile_after(
    db: Database, sent: str, settings: Settings, t0: datetime
) -> None:
    now = t0 + settings.reconcile_after
    assert reconcile(db, settings, now, None) is None
    assert silent(db, settings, now + settings.reconcile_after - TICK) == []
    assert silent(db, settings, now + settings.reconcile_after) == [sent]


def test_a_message_in_doubt_ends_unknown_after_the_receipt_window(
    db: Database, in_doubt: str, settings: Settings, t0: datetime
) -> None:
    assert reconcile(db, settings, t0 + settings.receipt_window, None) is MessageStatus.UNKNOWN
    message = load_message(db, in_doubt)
    assert (message.status, message.error_code) == ("unknown", "no-receipt")


def test_a_message_in_doubt_is_left_alone_inside_the_receipt_window(
    db: Database, in_doubt: str, settings: Settings, t0: datetime
) -> None:
    now = t0 + settings.receipt_window - TICK
    assert reconcile(db, settings, now, None) is None
    assert load_message(db, in_doubt).status == "in_doubt"


def test_the_report_says_which_calls_sms_was_reconciled(
    db: Database, sent: str, settings: Settings, t0: datetime
) -> None:
    reconcile(db, settings, t0 + settings.reconcile_after, MessageStatus.DELIVERED)
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        (row,) = deflected_calls(session, account, t0, t0 + timedelta(hours=1), 10)
    assert (row.messageSid, row.smsStatus, row.smsReconciled) == (sent, "delivered", True)
