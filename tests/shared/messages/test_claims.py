"""The worker's side of a message: claim it exactly once, retry it, record the provider's answer."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest

from shared.core.db import Database
from shared.core.models import MessageStatus
from shared.core.settings import Settings
from shared.messages.claims import (
    Claim,
    claim,
    record_accepted,
    retry_delay,
    schedule_retry,
)
from shared.messages.lifecycle import StatusReport, apply_status
from shared.messages.outbox import mark_published
from shared.providers.interface import TransientProviderError
from tests.support.data import CALLER_E164, SENDER, Demo
from tests.support.messages import accept_message, load_events, load_message

SECOND = timedelta(seconds=1)
TIMEOUT = TransientProviderError("timeout", "provider timed out")


@pytest.fixture
def sid(db: Database, demo: Demo, settings: Settings, t0: datetime) -> str:
    return accept_message(db, settings, t0)


def claim_at(db: Database, sid: str, settings: Settings, now: datetime) -> Claim | None:
    with db.transaction() as session:
        return claim(session, sid, settings, now)


def claimed(db: Database, sid: str, settings: Settings, now: datetime) -> Claim:
    owned = claim_at(db, sid, settings, now)
    assert owned is not None
    return owned


def test_claim_of_a_queued_message_returns_what_to_send(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    owned = claimed(db, sid, settings, t0)
    assert (owned.sid, owned.to_number, owned.from_number, owned.provider) == (
        sid,
        CALLER_E164,
        SENDER,
        "simulator",
    )
    assert owned.body.startswith("Please click here https://flows.example.com/start?lang=en&")
    assert (owned.in_doubt, owned.expires_at) == (False, t0 + settings.message_validity)


def test_first_claim_is_attempt_one(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    assert claimed(db, sid, settings, t0).attempts == 1


def test_claim_attempts_agree_with_the_stored_attempts(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    owned = claimed(db, sid, settings, t0)
    assert owned.attempts == load_message(db, sid).attempts


def test_claim_moves_the_message_to_sending_with_a_lease(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    claimed(db, sid, settings, t0)
    message = load_message(db, sid)
    assert (message.status, message.attempts, message.claimed_at, message.lease_expires_at) == (
        "sending",
        1,
        t0,
        t0 + settings.send_lease,
    )


def test_claim_wins_only_once_in_sequence(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    assert claim_at(db, sid, settings, t0) is not None
    assert claim_at(db, sid, settings, t0) is None
    assert load_message(db, sid).attempts == 1


def test_concurrent_claims_have_exactly_one_winner(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    contenders = 8
    start = threading.Barrier(contenders)

    def contend(_: int) -> Claim | None:
        with db.transaction() as session:
            start.wait(timeout=10)
            return claim(session, sid, settings, t0)

    with ThreadPoolExecutor(contenders) as pool:
        results = list(pool.map(contend, range(contenders)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert load_message(db, sid).attempts == 1


def test_claim_of_an_unknown_message_is_none(
    db: Database, demo: Demo, settings: Settings, t0: datetime
) -> None:
    assert claim_at(db, "SM" + "0" * 32, settings, t0) is None


def test_claim_past_expiry_expires_the_message_without_an_attempt(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    late = t0 + settings.message_validity
    assert claim_at(db, sid, settings, late) is None
    message = load_message(db, sid)
    assert (message.status, message.attempts, message.final_at) == ("expired", 0, late)
    assert [(e.status, e.source, e.applied) for e in load_events(db, sid)] == [
        ("expired", "worker", True)
    ]


def test_claim_just_before_expiry_still_wins(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    assert claim_at(db, sid, settings, t0 + settings.message_validity - SECOND) is not None


def test_sending_message_with_unexpired_lease_is_not_claimable(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    claimed(db, sid, settings, t0)
    assert claim_at(db, sid, settings, t0 + settings.send_lease - SECOND) is None
    assert load_message(db, sid).attempts == 1


def test_sending_message_with_expired_lease_is_claimed_in_doubt(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    claimed(db, sid, settings, t0)
    later = t0 + settings.send_lease
    owned = claimed(db, sid, settings, later)
    assert owned.in_doubt is True
    message = load_message(db, sid)
    assert (message.attempts, message.lease_expires_at) == (2, later + settings.send_lease)


@pytest.mark.parametrize(
    "status", [MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.FAILED]
)
def test_message_past_sending_is_never_claimed(
    db: Database, sid: str, settings: Settings, t0: datetime, status: MessageStatus
) -> None:
    with db.transaction() as session:
        apply_status(session, sid, StatusReport(status, source="worker"), t0)
    assert claim_at(db, sid, settings, t0 + timedelta(days=1)) is None
    assert load_message(db, sid).status == status


def test_schedule_retry_requeues_for_later(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    with db.transaction() as session:
        mark_published(session, [sid], t0)
    owned = claimed(db, sid, settings, t0 + SECOND)
    failed_at = t0 + 2 * SECOND
    with db.transaction() as session:
        delay = schedule_retry(session, owned, TIMEOUT, settings, failed_at)
    assert delay is not None
    assert delay > timedelta(0)
    message = load_message(db, sid)
    assert message.status == "queued"
    assert message.next_attempt_at == failed_at + delay
    assert message.next_attempt_at > failed_at
    assert (message.published_at, message.lease_expires_at) == (None, None)
    assert (message.error_code, message.error_message) == ("timeout", "provider timed out")


def test_requeued_message_can_be_claimed_again(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    owned = claimed(db, sid, settings, t0)
    with db.transaction() as session:
        delay = schedule_retry(session, owned, TIMEOUT, settings, t0)
    assert delay is not None
    again = claimed(db, sid, settings, t0 + delay)
    assert again.in_doubt is False
    assert load_message(db, sid).attempts == 2


def retry_until_out_of_time(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> list[tuple[datetime, timedelta | None]]:
    """Claim and fail transiently until the message can no longer be claimed; when each
    attempt failed and the delay it got."""
    attempts: list[tuple[datetime, timedelta | None]] = []
    now = t0
    while (owned := claim_at(db, sid, settings, now)) is not None:
        with db.transaction() as session:
            delay = schedule_retry(session, owned, TIMEOUT, settings, now)
        attempts.append((now, delay))
        now += delay or timedelta(0)
    return attempts


@pytest.fixture
def patient(settings: Settings) -> Settings:
    """Backoff capped at 20 minutes, so four hours of retries are a dozen or so attempts."""
    return settings.model_copy(update={"retry_backoff_max": timedelta(minutes=20)})


def test_transient_failures_are_retried_until_the_validity_ends_not_a_fixed_count(
    db: Database, sid: str, patient: Settings, t0: datetime
) -> None:
    attempts = retry_until_out_of_time(db, sid, patient, t0)
    assert len(attempts) > patient.max_send_attempts
    last_try = attempts[-1][0]
    expires_at = t0 + patient.message_validity
    # The last try came within one (capped) backoff of the end of the message's validity.
    assert expires_at - patient.retry_backoff_max <= last_try < expires_at


def test_schedule_retry_expires_the_message_when_its_validity_ends_first(
    db: Database, sid: str, patient: Settings, t0: datetime
) -> None:
    attempts = retry_until_out_of_time(db, sid, patient, t0)
    assert attempts[-1][1] is None
    assert all(delay is not None for _, delay in attempts[:-1])
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("expired", "timeout")
    assert message.final_at is not None


def test_running_out_of_time_is_recorded_as_a_worker_event(
    db: Database, sid: str, patient: Settings, t0: datetime
) -> None:
    retry_until_out_of_time(db, sid, patient, t0)
    last = load_events(db, sid)[-1]
    assert (last.status, last.source, last.error_code, last.applied) == (
        "expired",
        "worker",
        "timeout",
        True,
    )


def test_schedule_retry_expires_a_message_whose_retry_would_land_after_expiry(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    almost_expired = t0 + settings.message_validity - timedelta(milliseconds=1)
    owned = claimed(db, sid, settings, almost_expired)
    with db.transaction() as session:
        assert schedule_retry(session, owned, TIMEOUT, settings, almost_expired) is None
    assert load_message(db, sid).status == "expired"


def test_retry_delay_ceiling_grows_with_attempts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    roomy = settings.model_copy(
        update={"retry_backoff_base": timedelta(seconds=2), "retry_backoff_max": timedelta(hours=1)}
    )
    monkeypatch.setattr("shared.messages.claims.random.random", lambda: 1.0)
    delays = [retry_delay(attempt, roomy).total_seconds() for attempt in range(1, 6)]
    assert delays == [2, 4, 8, 16, 32]


def test_retry_delay_is_jittered_between_half_and_all_of_its_ceiling(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = settings.retry_backoff_base
    monkeypatch.setattr("shared.messages.claims.random.random", lambda: 0.0)
    assert retry_delay(1, settings) == base / 2


def test_retry_delay_grows_between_attempts(settings: Settings) -> None:
    # The smallest delay of attempt n+2 is twice the largest of attempt n, jitter or not.
    roomy = settings.model_copy(update={"retry_backoff_max": timedelta(hours=1)})
    for attempt in range(1, 6):
        assert min(retry_delay(attempt + 2, roomy) for _ in range(50)) >= max(
            retry_delay(attempt, roomy) for _ in range(50)
        )


def test_retry_delay_never_exceeds_retry_backoff_max(settings: Settings) -> None:
    delays = [retry_delay(attempt, settings) for attempt in range(1, 40) for _ in range(20)]
    assert max(delays) <= settings.retry_backoff_max


def test_record_accepted_marks_the_message_sent(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    owned = claimed(db, sid, settings, t0)
    with db.transaction() as session:
        record_accepted(session, owned, "SIM-1", "queued", t0 + SECOND)
    message = load_message(db, sid)
    assert (message.status, message.provider_message_id, message.sent_at) == (
        "sent",
        "SIM-1",
        t0 + SECOND,
    )
    assert message.lease_expires_at is None


def test_record_accepted_keeps_an_earlier_delivered_and_stores_the_provider_id(
    db: Database, sid: str, settings: Settings, t0: datetime
) -> None:
    owned = claimed(db, sid, settings, t0)
    with db.transaction() as session:
        apply_status(session, sid, StatusReport(MessageStatus.DELIVERED, source="callback"), t0)
    with db.transaction() as session:
        record_accepted(session, owned, "SIM-1", "queued", t0 + SECOND)
    message = load_message(db, sid)
    assert (message.status, message.provider_message_id) == ("delivered", "SIM-1")
    assert [(e.status, e.applied) for e in load_events(db, sid)] == [
        ("delivered", True),
        ("sent", False),
    ]
