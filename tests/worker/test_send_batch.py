"""The batch send task (`sms.send_batch`) run in-process against the real database and broker,
with a provider plugin that answers as each test scripts it (a fake provider, registered like
any other): each message is sent once and recorded as a lone send would record it, whatever
else the batch holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import OperationalError

from shared.core.db import Database
from shared.core.models import DeliveryEvent, MessageStatus, ProviderAccount, utcnow
from shared.core.settings import Settings
from shared.messages.lifecycle import StatusReport, apply_status
from shared.messages.optout import add_opt_out
from shared.messages.send import Sender
from shared.providers.circuit_breakers import LocalCircuitBreakers
from shared.providers.interface import SendRequest, SendResult, register
from shared.providers.rate_limits import LocalRateLimits
from shared.providers.registry import ProviderClients
from shared.text.phone import normalise_sender
from tests.support.data import CALLER_E164, SENDER, Demo, create_demo
from tests.support.messages import (
    accept_message,
    load_deflected_call,
    load_events,
    load_message,
)
from tests.support.processes import ROOT
from worker import celery_app, metrics, tasks

PROVIDER = "batch-scripted"


class BatchProvider:
    """Takes every message, except those a test scripted to raise; notes every call."""

    name: ClassVar[str] = PROVIDER
    idempotent: ClassVar[bool] = True
    searchable: ClassVar[bool] = False
    lock: ClassVar[threading.Lock] = threading.Lock()
    calls: ClassVar[list[str]] = []
    # sid -> what its send raises.
    raises: ClassVar[dict[str, BaseException]] = {}
    # sid -> run before answering (a receipt that overtakes the worker's record).
    before_answer: ClassVar[dict[str, Any]] = {}
    in_flight: ClassVar[int] = 0
    most_in_flight: ClassVar[int] = 0
    delay: ClassVar[float] = 0.0

    def __init__(self, _credentials: Mapping[str, Any], _settings: Settings) -> None:
        pass

    def send(self, request: SendRequest) -> SendResult:
        sid = request.idempotency_key
        with BatchProvider.lock:
            BatchProvider.calls.append(sid)
            BatchProvider.in_flight += 1
            BatchProvider.most_in_flight = max(BatchProvider.most_in_flight, self.in_flight)
        try:
            if BatchProvider.delay:
                threading.Event().wait(BatchProvider.delay)
            if sid in BatchProvider.raises:
                raise BatchProvider.raises[sid]
            if sid in BatchProvider.before_answer:
                BatchProvider.before_answer[sid]()
            return SendResult(f"batch-{sid}", "queued", {})
        finally:
            with BatchProvider.lock:
                BatchProvider.in_flight -= 1

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        raise NotImplementedError  # not searchable

    def status_of(self, provider_message_id: str) -> str | None:
        return None

    def close(self) -> None:
        pass


register(PROVIDER)(BatchProvider)


def _reset() -> None:
    BatchProvider.calls = []
    BatchProvider.raises = {}
    BatchProvider.before_answer = {}
    BatchProvider.in_flight = 0
    BatchProvider.most_in_flight = 0
    BatchProvider.delay = 0.0


@pytest.fixture
def scripted(demo: Demo, db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(provider=PROVIDER))
    # Provider clients are cached by provider-settings id, which restarts in every test.
    monkeypatch.setattr(tasks.sender(), "providers", ProviderClients(tasks.sender().settings))
    _reset()
    yield
    _reset()


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
    return found


def moved(before: dict[str, float]) -> dict[str, float]:
    return {key: now - before[key] for key, now in counts().items() if now != before[key]}


def worker_events(db: Database, sid: str) -> list[tuple[str, str | None, bool]]:
    return [(e.source, e.status, e.applied) for e in load_events(db, sid)]


def test_a_batch_sends_each_message_once_and_records_each_as_sent_with_sms_sent(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow()) for _ in range(12)]
    before = counts()
    tasks.send_batch(sids)

    assert sorted(BatchProvider.calls) == sorted(sids)
    for sid in sids:
        message = load_message(db, sid)
        assert (message.status, message.provider_message_id) == ("sent", f"batch-{sid}")
        assert message.sent_at is not None
        assert (message.lease_expires_at, message.error_code) == (None, None)
        assert worker_events(db, sid) == [("worker", "sent", True)]
        call = load_deflected_call(db, sid)
        assert (call.sms_sent, call.sms_count, call.last_message_sid) == (True, 1, sid)
        assert call.sms_sent_at is not None
    assert moved(before) == {"sent": 12, "calls": 12}


def test_a_batch_sends_its_messages_concurrently(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(8)]
    BatchProvider.delay = 0.2
    tasks.send_batch(sids)

    assert BatchProvider.most_in_flight == 8
    assert {load_message(db, sid).status for sid in sids} == {"sent"}


def test_a_batch_of_messages_in_every_state_handles_each_as_a_lone_send_would(
    scripted: None, demo: Demo, db: Database, migrated: Settings
) -> None:
    now = utcnow()
    already_sent = accept_message(db, migrated, now)
    tasks.send_message(already_sent)
    expired = accept_message(
        db, migrated, now - migrated.message_validity - timedelta(minutes=1), with_token=False
    )
    queued_to_them = accept_message(db, migrated, now)
    # Opted out: the recipient every demo message goes to, so accepted before the opt-out.
    opted_out = accept_message(db, migrated, now, with_token=False)
    with db.transaction() as session:
        add_opt_out(
            session,
            demo.account_id,
            normalise_sender(SENDER, migrated.default_region),
            CALLER_E164,
            utcnow(),
        )
    BatchProvider.calls = []
    before = counts()
    tasks.send_batch([already_sent, expired, "SM" + "0" * 32, opted_out, queued_to_them])

    assert load_message(db, already_sent).status == "sent"
    assert worker_events(db, already_sent) == [("worker", "sent", True)]
    assert load_message(db, expired).status == "expired"
    assert load_message(db, opted_out).status == "opted_out"
    # The last queued message is to the same recipient: opted out too by now.
    assert load_message(db, queued_to_them).status == "opted_out"
    assert BatchProvider.calls == []
    assert moved(before) == {"expired": 1, "opted_out": 2}


def test_already_sent_expired_and_unknown_sids_beside_queued_ones(
    scripted: None, db: Database, migrated: Settings
) -> None:
    now = utcnow()
    already_sent = accept_message(db, migrated, now)
    tasks.send_message(already_sent)
    expired = accept_message(
        db, migrated, now - migrated.message_validity - timedelta(minutes=1), with_token=False
    )
    queued = [accept_message(db, migrated, now) for _ in range(3)]
    BatchProvider.calls = []
    before = counts()
    tasks.send_batch([already_sent, *queued, "SM" + "0" * 32, expired])

    assert sorted(BatchProvider.calls) == sorted(queued)
    assert [load_message(db, sid).status for sid in queued] == ["sent"] * 3
    assert (load_message(db, already_sent).status, load_message(db, expired).status) == (
        "sent",
        "expired",
    )
    assert load_deflected_call(db, already_sent).sms_count == 1
    assert moved(before) == {"sent": 3, "expired": 1, "calls": 3}


def test_one_poisoned_message_fails_alone_and_the_rest_are_sent(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow()) for _ in range(6)]
    poisoned = sids[2]
    BatchProvider.raises = {poisoned: RuntimeError("boom")}
    before = counts()
    tasks.send_batch(sids)

    message = load_message(db, poisoned)
    # Today's AdapterBug way: retried (a bounded number of times), with the reason kept.
    assert (message.status, message.attempts) == ("queued", 1)
    assert (message.error_code, message.error_message) == ("error", "RuntimeError: boom")
    assert load_deflected_call(db, poisoned).sms_sent is False
    for sid in sids:
        if sid != poisoned:
            assert load_message(db, sid).status == "sent"
            assert load_deflected_call(db, sid).sms_sent is True
    assert moved(before) == {"sent": 5, "retry": 1, "calls": 6}


def test_a_message_that_cannot_even_be_prepared_fails_alone(
    scripted: None, db: Database, migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bad data: building the provider request itself raises for one message.
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(3)]
    bad = sids[1]
    sender = tasks.sender()
    build = type(sender)._request

    def request(self: Any, owned: Any) -> SendRequest:
        if owned.sid == bad:
            raise ValueError("bad data")
        return build(self, owned)

    monkeypatch.setattr(type(sender), "_request", request)
    tasks.send_batch(sids)

    message = load_message(db, bad)
    assert (message.status, message.error_message) == ("queued", "ValueError: bad data")
    assert bad not in BatchProvider.calls
    assert [load_message(db, sid).status for sid in sids if sid != bad] == ["sent", "sent"]


def test_a_batch_task_run_twice_sends_nothing_twice(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow()) for _ in range(5)]
    tasks.send_batch(sids)
    before = counts()
    tasks.send_batch(sids)  # broker redelivery, or the sweeper's copy
    tasks.send_batch([*sids[:2], *sids[:2]])  # a sid twice in one batch

    assert sorted(BatchProvider.calls) == sorted(sids)
    with db.transaction() as session:
        events = session.scalar(select(func.count(DeliveryEvent.id)))
    assert events == len(sids)
    assert {load_deflected_call(db, sid).sms_count for sid in sids} == {1}
    assert moved(before) == {}


def test_a_receipt_that_overtakes_the_batch_record_is_kept_and_the_id_too(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow()) for _ in range(3)]
    overtaken = sids[0]

    def delivered_already() -> None:
        with db.transaction() as session:
            apply_status(
                session,
                overtaken,
                StatusReport(MessageStatus.DELIVERED, source="callback", provider=PROVIDER),
                utcnow(),
            )

    BatchProvider.before_answer = {overtaken: delivered_already}
    tasks.send_batch(sids)

    message = load_message(db, overtaken)
    assert (message.status, message.provider_message_id) == ("delivered", f"batch-{overtaken}")
    assert worker_events(db, overtaken) == [
        ("callback", "delivered", True),
        ("worker", "sent", False),
    ]
    call = load_deflected_call(db, overtaken)
    assert (call.sms_sent, call.sms_count) == (True, 1)
    assert [load_message(db, sid).status for sid in sids[1:]] == ["sent", "sent"]


def test_a_batch_over_its_sender_rate_sends_what_the_rate_allows_and_throttles_the_rest(
    scripted: None, db: Database, migrated: Settings
) -> None:
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(sender_rate=0.01))  # one per 100 s
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(4)]
    before = counts()
    tasks.send_batch(sids)

    statuses = sorted(load_message(db, sid).status for sid in sids)
    assert statuses == ["queued", "queued", "queued", "sent"]
    assert moved(before) == {"sent": 1, "throttled": 3, "calls": 1}


def test_a_batch_is_claimed_in_one_statement_and_recorded_in_four_whatever_its_size(
    scripted: None, db: Database, migrated: Settings
) -> None:
    def statements_for(size: int) -> list[str]:
        sids = [accept_message(db, migrated, utcnow()) for _ in range(size)]
        seen: list[list[str]] = []

        def note(*args: Any) -> None:
            seen.append(args[2].split(maxsplit=3)[:3])

        engine = tasks.sender().db.engine
        event.listen(engine, "before_cursor_execute", note)
        try:
            tasks.send_batch(sids)
        finally:
            event.remove(engine, "before_cursor_execute", note)
        assert {load_message(db, sid).status for sid in sids} == {"sent"}
        return [" ".join(words) for words in seen]

    small, large = statements_for(2), statements_for(10)
    assert small == large
    assert small == [
        "UPDATE messages SET",  # the claim
        "UPDATE messages SET",  # sent
        "INSERT INTO delivery_events",
        "SELECT deflected_calls.token_id FROM",  # the calls locked in token order
        "UPDATE deflected_calls SET",
    ]


def test_on_sqlite_every_message_of_a_batch_takes_the_lone_way_and_is_sent(
    migrated: Settings, tmp_path: Path
) -> None:
    # The embedded default: SQLite cannot claim a batch in one statement, so each message is
    # claimed and recorded as a lone send, on the same send threads.
    url = f"sqlite:///{tmp_path}/embedded.sqlite3"
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "migrate"],
        check=True,
        cwd=ROOT,
        env={**os.environ, "SMSD_DATABASE_URL": url},
        capture_output=True,
        timeout=120,
    )
    settings = migrated.model_copy(update={"database_url": url, "redis_url": None})
    db = Database(settings)
    try:
        create_demo(db)
        with db.transaction() as session:
            session.execute(update(ProviderAccount).values(provider=PROVIDER))
        _reset()
        sids = [accept_message(db, settings, utcnow()) for _ in range(6)]
        sender = Sender(
            settings,
            db,
            celery_app.app,
            ProviderClients(settings),
            LocalRateLimits(),
            LocalCircuitBreakers(settings),
        )
        outcomes = sender.send_batch([*sids, "SM" + "0" * 32])
        again = sender.send_batch(sids)
        assert [load_message(db, sid).status for sid in sids] == ["sent"] * 6
        assert {load_deflected_call(db, sid).sms_count for sid in sids} == {1}
        assert sorted(BatchProvider.calls) == sorted(sids)
    finally:
        db.dispose()
        _reset()

    assert [o.outcome.value if o.outcome else None for o in outcomes] == ["sent"] * 6 + [None]
    assert [o.outcome for o in again] == [None] * 6


def test_a_batch_whose_provider_circuit_is_open_waits_for_it(
    scripted: None, db: Database, migrated: Settings
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(3)]
    with db.transaction() as session:
        provider_account_id = session.scalar(select(ProviderAccount.id).limit(1))
    assert provider_account_id is not None
    for _ in range(migrated.breaker_threshold):
        tasks.sender().breakers.failed(provider_account_id)
    before = counts()
    tasks.send_batch(sids)

    assert BatchProvider.calls == []
    for sid in sids:
        message = load_message(db, sid)
        assert (message.status, message.attempts) == ("queued", 0)
        assert message.next_attempt_at is not None
    assert moved(before) == {"paused": 3}


def test_a_database_error_on_one_message_retries_the_task_after_the_rest_are_recorded(
    scripted: None, db: Database, migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(4)]
    unlucky = sids[0]
    BatchProvider.raises = {unlucky: RuntimeError("boom")}
    sender = tasks.sender()
    record_failure = type(sender)._failed

    def failed(self: Any, owned: Any, error: Any) -> Any:
        if owned.sid == unlucky:
            raise OperationalError("UPDATE", {}, Exception("the database went away"))
        return record_failure(self, owned, error)

    monkeypatch.setattr(type(sender), "_failed", failed)
    before = counts()
    # Called directly, Celery's autoretry raises what it would retry on.
    with pytest.raises(OperationalError):
        tasks.send_batch(sids)

    assert [load_message(db, sid).status for sid in sids[1:]] == ["sent"] * 3
    assert load_message(db, unlucky).status == "sending"  # left to its lease, as today
    assert moved(before) == {"sent": 3, "calls": 3}
