"""Each way a send task ends is counted once, under its provider, after it was recorded: the
send task run in-process against the real database and broker with a scripted provider."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar

import pytest
from celery.signals import task_retry
from sqlalchemy import update

from shared.core.db import Database
from shared.core.models import ProviderAccount, utcnow
from shared.core.settings import Settings
from shared.messages.optout import add_opt_out
from shared.providers.interface import (
    PermanentProviderError,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    TransientProviderError,
    register,
)
from shared.providers.registry import ProviderClients
from shared.text.phone import normalise_sender
from tests.support.data import CALLER_E164, SENDER, Demo
from tests.support.messages import accept_message, load_message
from worker import metrics, tasks

PROVIDER = "scripted"


class ScriptedProvider:
    """Answers each send with the next scripted error, or takes the message when none is left."""

    name: ClassVar[str] = PROVIDER
    idempotent: ClassVar[bool] = True
    searchable: ClassVar[bool] = False
    script: ClassVar[list[ProviderError]] = []

    def __init__(self, _credentials: Mapping[str, Any], _settings: Settings) -> None:
        pass

    def send(self, request: SendRequest) -> SendResult:
        if ScriptedProvider.script:
            raise ScriptedProvider.script.pop(0)
        return SendResult(f"scripted-{request.idempotency_key}", "queued", {})

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        raise NotImplementedError  # not searchable

    def status_of(self, provider_message_id: str) -> str | None:
        return None

    def close(self) -> None:
        pass


register(PROVIDER)(ScriptedProvider)


@pytest.fixture
def scripted(demo: Demo, db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(provider=PROVIDER))
    # Provider clients are cached by provider-settings id, which restarts in every test.
    monkeypatch.setattr(tasks.sender(), "providers", ProviderClients(tasks.sender().settings))
    ScriptedProvider.script = []
    yield
    ScriptedProvider.script = []


def counts() -> dict[str, float]:
    """This process's send outcomes for the scripted provider, plus calls and retries."""
    registry = metrics.REGISTRY
    found = {
        outcome: registry.get_sample_value(
            "smsd_sends_total", {"provider": PROVIDER, "outcome": outcome}
        )
        or 0.0
        for outcome in metrics.OUTCOMES
    }
    found["calls"] = (
        registry.get_sample_value("smsd_send_duration_seconds_count", {"provider": PROVIDER}) or 0.0
    )
    found["retries"] = (
        registry.get_sample_value("smsd_send_retries_total", {"reason": "provider"}) or 0.0
    )
    return found


def moved(before: dict[str, float]) -> dict[str, float]:
    """What changed since `before`, leaving out what did not."""
    return {key: now - before[key] for key, now in counts().items() if now != before[key]}


def test_a_send_the_provider_takes_counts_sent_and_its_call(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    before = counts()
    tasks.send_message(sid)

    assert load_message(db, sid).status == "sent"
    assert moved(before) == {"sent": 1, "calls": 1}


def test_a_copy_of_a_task_that_has_nothing_left_to_do_counts_nothing(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    tasks.send_message(sid)
    before = counts()
    tasks.send_message(sid)  # broker redelivery or a sweeper copy

    assert moved(before) == {}


@pytest.mark.parametrize(
    ("error", "status", "outcome"),
    [
        (TransientProviderError("503", "try later"), "queued", {"retry": 1, "retries": 1}),
        (PermanentProviderError("21211", "invalid number"), "failed", {"failed": 1}),
        (RecipientOptedOut("21610", "unsubscribed"), "opted_out", {"opted_out": 1}),
    ],
    ids=["transient", "permanent", "opted-out-by-provider"],
)
def test_a_provider_error_counts_its_outcome(
    scripted: None,
    db: Database,
    migrated: Settings,
    error: ProviderError,
    status: str,
    outcome: dict[str, float],
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    ScriptedProvider.script = [error]
    before = counts()
    tasks.send_message(sid)

    assert load_message(db, sid).status == status
    assert moved(before) == {**outcome, "calls": 1}


def test_a_transient_failure_when_validity_runs_out_counts_expired(
    scripted: None, db: Database, migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its validity ends in a few seconds; the next retry could come only after a minute.
    patient = migrated.model_copy(
        update={"retry_backoff_base": timedelta(minutes=2), "retry_backoff_max": timedelta(hours=1)}
    )
    monkeypatch.setattr(tasks.sender(), "settings", patient)
    accepted_at = utcnow() - migrated.message_validity + timedelta(seconds=5)
    sid = accept_message(db, migrated, accepted_at, with_token=False)
    ScriptedProvider.script = [TransientProviderError("503", "try later")] * 99
    before = counts()
    tasks.send_message(sid)

    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("expired", "503")
    assert moved(before) == {"expired": 1, "calls": 1}


def test_a_message_past_its_validity_counts_expired(
    scripted: None, db: Database, migrated: Settings
) -> None:
    accepted_at = utcnow() - migrated.message_validity - timedelta(minutes=1)
    sid = accept_message(db, migrated, accepted_at, with_token=False)
    before = counts()
    tasks.send_message(sid)

    assert load_message(db, sid).status == "expired"
    assert moved(before) == {"expired": 1}


def test_a_recipient_known_to_have_opted_out_counts_opted_out(
    scripted: None, demo: Demo, db: Database, migrated: Settings
) -> None:
    sender = normalise_sender(SENDER, migrated.default_region)
    with db.transaction() as session:
        add_opt_out(session, demo.account_id, sender, CALLER_E164, utcnow())
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    before = counts()
    tasks.send_message(sid)

    assert load_message(db, sid).status == "opted_out"
    assert moved(before) == {"opted_out": 1}


def test_a_send_over_its_rate_limit_counts_throttled(
    scripted: None, db: Database, migrated: Settings
) -> None:
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(sender_rate=0.01))  # one per 100 s
    first, second = (accept_message(db, migrated, utcnow(), with_token=False) for _ in range(2))
    before = counts()
    tasks.send_message(first)
    tasks.send_message(second)

    assert (load_message(db, first).status, load_message(db, second).status) == (
        "sent",
        "queued",
    )
    assert moved(before) == {"sent": 1, "throttled": 1, "calls": 1}


def test_a_send_task_celery_retries_counts_a_database_retry() -> None:
    # What Celery signals when autoretry_for catches the database failing the send task.
    def database_retries() -> float:
        value = metrics.REGISTRY.get_sample_value("smsd_send_retries_total", {"reason": "database"})
        return value or 0.0

    before = database_retries()
    task_retry.send(sender=tasks.send_message, request=None, reason="db down", einfo=None)
    task_retry.send(sender=tasks.sweep, request=None, reason="db down", einfo=None)

    assert database_retries() == before + 1
