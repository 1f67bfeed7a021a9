"""Reconciliation: a message the provider took (or may have) that never got a final word is
asked about at the provider, and past SMSD_RECEIPT_WINDOW ends `unknown`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from shared.core.db import Database
from shared.core.models import MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.lifecycle import StatusReport, apply_status
from shared.providers import simulator, twilio, vonage
from shared.providers.registry import ProviderClients

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Silent:
    """A message the provider took (or may have) that never got a final word."""

    sid: str
    status: MessageStatus
    provider: str
    provider_account_id: int
    credentials: dict[str, Any]
    provider_message_id: str | None
    since: datetime


# How many silent messages one sweep asks about: each is a provider call, and the sweep must
# stay short; the rest wait for the next sweep.
RECONCILE_BATCH = 100


def silent_messages(session: Session, settings: Settings, now: datetime) -> list[Silent]:
    """`sent` or `in_doubt` messages with no word from the provider for SMSD_RECONCILE_AFTER
    and not asked about since: the reconciler's work, oldest first.

    Taken: marked asked (`reconciled_at`) in the same statement, with rows another sweep is
    taking skipped, so overlapping sweeps never ask about one message twice."""
    rows = queries.take_silent(session, now - settings.reconcile_after, now, RECONCILE_BATCH)
    return [
        Silent(
            sid=row.sid,
            status=MessageStatus(row.status),
            provider=row.provider,
            provider_account_id=row.id,
            credentials=dict(row.credentials or {}),
            provider_message_id=row.provider_message_id,
            since=row.sent_at or row.updated_at,
        )
        for row in rows
    ]


def record_reconciled(
    session: Session,
    silent: Silent,
    status: MessageStatus | None,
    provider_status: str | None,
    settings: Settings,
    now: datetime,
) -> MessageStatus | None:
    """What asking the provider gave (`status`, None when it could not be asked or said
    nothing new); past the receipt window a message with no final word ends `unknown`.
    Returns the status applied, if any."""
    report: StatusReport | None = None
    if status is not None and status.rank > silent.status.rank:
        report = StatusReport(
            status,
            source="reconcile",
            provider=silent.provider,
            provider_status=provider_status,
            provider_message_id=silent.provider_message_id,
        )
    elif silent.since <= now - settings.receipt_window:
        report = StatusReport(
            MessageStatus.UNKNOWN,
            source="reconcile",
            provider=silent.provider,
            provider_status=provider_status,
            error_code="no-receipt",
            error_message="no final status from the provider within SMSD_RECEIPT_WINDOW",
        )
    if report is None:
        return None
    applied = apply_status(session, silent.sid, report, now)
    return report.status if applied else None


# How each provider's status words map onto ours, for what the reconciler hears.
_STATUS_WORDS = {
    "twilio": twilio.TWILIO_STATUSES,
    "vonage": vonage.VONAGE_STATUSES,
    "simulator": simulator.SIMULATOR_STATUSES,
}


def reconcile(db: Database, providers: ProviderClients, settings: Settings) -> int:
    """Ask the provider about messages with no final word after SMSD_RECONCILE_AFTER (where
    it can be asked), and end those past SMSD_RECEIPT_WINDOW `unknown`; returns how many
    changed status."""
    with db.transaction() as session:
        silent = silent_messages(session, settings, utcnow())
    changed = 0
    for message in silent:
        word: str | None = None
        if message.provider_message_id:
            try:
                client = providers.client(
                    message.provider, message.provider_account_id, message.credentials
                )
                word = client.status_of(message.provider_message_id)
            except Exception as exc:
                log.warning("reconcile.ask_failed", messageSid=message.sid, error=str(exc))
        status = _STATUS_WORDS.get(message.provider, {}).get((word or "").lower())
        with db.transaction() as session:
            applied = record_reconciled(session, message, status, word, settings, utcnow())
        if applied is not None:
            changed += 1
            log.info("reconcile.settled", messageSid=message.sid, status=applied.value)
    return changed
