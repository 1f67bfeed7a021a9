"""Status callbacks against the real PostgreSQL and a real HTTP receiver on loopback: the
trigger queues every status change of a message with a callback, and the deliverer POSTs them
signed, in order per message, retries with backoff, gives up in time, records every attempt
and refuses addresses the operator does not allow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from shared.accounts.webhook_secrets import current_secret, rotate_secret
from shared.core.broker import STATUS_CALLBACKS_TASK, callbacks_queue, celery_config, lane_queues
from shared.core.db import Database
from shared.core.models import (
    Message,
    MessageStatus,
    StatusCallback,
    StatusCallbackAttempt,
    utcnow,
)
from shared.core.settings import Settings
from shared.messages.lifecycle import StatusMove, StatusReport, apply_status_batch
from shared.messages.queries import callback_targets
from shared.messages.status_callbacks import (
    EVENT_ID_HEADER,
    NO_ALLOWED_ADDRESS,
    SIGNATURE_HEADER,
    StatusCallbackDeliverer,
    claim_due,
)
from tests.support.data import Demo, create_demo
from tests.support.messages import accept_message
from tests.support.processes import wait_until
from tests.support.receiver import Receiver

README = Path(__file__).resolve().parents[3] / "README.md"
LIFE_ORDINALS = {"sending": 1, "sent": 2, "delivered": 3}


def readme_verify() -> Callable[..., bool]:
    """The receiving side's check exactly as the README shows it."""
    block = re.search(
        r"<!-- status-callback-verification -->\s*```python\n(.*?)```", README.read_text(), re.S
    )
    assert block, "the README's verification example is missing"
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # noqa: S102 - our own README, the code under test
    verify: Callable[..., bool] = namespace["verify"]
    return verify


def _move(db: Database, sid: str, *statuses: str) -> None:
    """Status changes as the send path makes them: one transaction each."""
    for status in statuses:
        with db.transaction() as session:
            session.execute(update(Message).where(Message.sid == sid).values(status=status))


def _secret(db: Database, demo: Demo) -> str:
    with db.transaction() as session:
        return current_secret(session, demo.account_id, utcnow())


def _deliver_until(
    deliverer: StatusCallbackDeliverer, done: Callable[[], bool], seconds: float = 15
) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "callbacks not delivered in time"
        deliverer.run()
        time.sleep(0.05)


def test_every_status_change_of_a_message_with_a_callback_is_queued_and_no_other(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    now = utcnow()
    with_callback = accept_message(db, migrated, now, status_callback=receiver.url())
    without = accept_message(db, migrated, now)
    _move(db, with_callback, "sending", "sent", "sent", "delivered")
    _move(db, without, "sending", "sent")
    with db.transaction() as session:
        queued = session.execute(
            select(StatusCallback.message_sid, StatusCallback.status).order_by(StatusCallback.id)
        ).all()
    # A write that leaves the status as it was is no change.
    assert queued == [
        (with_callback, "sending"),
        (with_callback, "sent"),
        (with_callback, "delivered"),
    ]


def test_callbacks_arrive_in_order_signed_and_verifiable_with_the_readme_example(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url("/hook?x=1"))
    _move(db, sid, "sending", "sent", "delivered")
    _deliver_until(StatusCallbackDeliverer(db, migrated), lambda: len(receiver.received) == 3)
    assert receiver.statuses(sid) == ["sending", "sent", "delivered"]
    verify = readme_verify()
    secret = _secret(db, demo)
    for got in receiver.received:
        assert got.path == "/hook?x=1"
        assert got.headers["Content-Type"] == "application/json"
        assert verify(secret, got.headers[SIGNATURE_HEADER], got.body)
        assert not verify(secret, got.headers[SIGNATURE_HEADER], got.body + b" ")
        assert not verify("whsec_wrong", got.headers[SIGNATURE_HEADER], got.body)
        body = got.json
        assert body["eventId"] == got.headers[EVENT_ID_HEADER]
        assert body["eventId"] == f"{sid}-{LIFE_ORDINALS[body['status']]}"
        assert body["messageSid"] == sid
        assert body["accountId"] == demo.tenant
        assert body["campaignId"] == "campaign1"
        assert body["batchId"] is None
        assert body["createdAt"].endswith("Z")
        assert body["changedAt"].endswith("Z")
    # A stale signature (a replay) is refused by the README's check.
    old = receiver.received[0]
    stale = re.sub(r"t=\d+", f"t={int(time.time()) - 3600}", old.headers[SIGNATURE_HEADER])
    assert not verify(secret, stale, old.body)
    # A header that is not one is refused, not an exception in the receiver.
    for malformed in ("", "garbage", "t=abc,v1=00", "v1=00", "t=1,t=2,v1=00"):
        assert not verify(secret, malformed, old.body)


def test_a_failing_change_holds_the_next_back_and_is_retried_until_it_is_delivered(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    answers = iter([500, 503, 200])
    receiver.answer = lambda got: next(answers) if got.json["status"] == "sending" else 200
    _move(db, sid, "sending", "sent")
    _deliver_until(StatusCallbackDeliverer(db, migrated), lambda: "sent" in receiver.statuses(sid))
    # Three tries of the first change, then the second: never the second before the first.
    assert receiver.statuses(sid) == ["sending", "sending", "sending", "sent"]
    with db.transaction() as session:
        first = session.scalars(select(StatusCallback).order_by(StatusCallback.id)).first()
        assert first is not None
        assert (first.outcome, first.attempts) == ("delivered", 3)
        tried = session.scalars(
            select(StatusCallbackAttempt.response_status)
            .where(StatusCallbackAttempt.callback_id == first.id)
            .order_by(StatusCallbackAttempt.id)
        ).all()
    assert tried == [500, 503, 200]


def test_a_receiver_that_stays_down_is_given_up_on_once_the_retry_time_has_passed(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    receiver.stop()  # connection refused from now on
    short = migrated.model_copy(update={"status_callback_retry_for": timedelta(seconds=2)})
    sid = accept_message(db, short, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending", "sent")
    deliverer = StatusCallbackDeliverer(db, short)

    def settled() -> bool:
        with db.transaction() as session:
            return not session.scalar(select(func.count()).where(StatusCallback.done_at.is_(None)))

    _deliver_until(deliverer, settled)
    with db.transaction() as session:
        outcomes = session.execute(
            select(StatusCallback.status, StatusCallback.outcome, StatusCallback.attempts).order_by(
                StatusCallback.id
            )
        ).all()
        errors = set(session.scalars(select(StatusCallbackAttempt.error)))
    assert [(status, outcome) for status, outcome, _ in outcomes] == [
        ("sending", "given_up"),
        ("sent", "given_up"),
    ]
    # Retried with backoff for its two seconds; the second change waited behind the first, its
    # time counted from when it happened, and still had its try once the first was given up.
    assert outcomes[0][2] >= 2
    assert outcomes[1][2] >= 1
    assert errors == {"connection failed"}


def test_a_redirect_is_not_followed_but_counted_as_a_failed_attempt(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    receiver.answer = lambda got: (
        302 if got.path == "/status" and len(receiver.received) == 1 else 200
    )
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    _deliver_until(StatusCallbackDeliverer(db, migrated), lambda: len(receiver.received) == 2)
    assert [got.path for got in receiver.received] == ["/status", "/status"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_an_address_the_operator_does_not_allow_is_never_reached_nor_named_to_the_account(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver, host: str
) -> None:
    # Accepted while loopback was allowed (the suite's setting); delivered by a deliverer of an
    # operator who allows nothing: it must resolve `localhost` and refuse what it finds.
    sid = accept_message(
        db, migrated, utcnow(), status_callback=receiver.url().replace("127.0.0.1", host)
    )
    _move(db, sid, "sending")
    strict = migrated.model_copy(update={"status_callback_allowed_networks": ""})
    outcomes = StatusCallbackDeliverer(db, strict).run()
    assert outcomes == {"refused": 1}  # for the operator's metrics
    assert receiver.received == []
    with db.transaction() as session:
        callback = session.scalars(select(StatusCallback)).one()
        attempt = session.scalars(select(StatusCallbackAttempt)).one()
    # Retried like any failure, and said no more about than a name that does not resolve: the
    # account learns nothing of what the operator's network holds.
    assert callback.outcome is None
    assert callback.done_at is None
    assert callback.next_attempt_at > attempt.attempted_at
    assert attempt.error == NO_ALLOWED_ADDRESS
    assert attempt.response_status is None


def test_a_name_that_does_not_resolve_says_the_same_as_a_refused_one(
    db: Database, demo: Demo, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback="http://nowhere.invalid/x")
    _move(db, sid, "sending")
    assert StatusCallbackDeliverer(db, migrated).run() == {"retrying": 1}
    with db.transaction() as session:
        attempt = session.scalars(select(StatusCallbackAttempt)).one()
    assert attempt.error == NO_ALLOWED_ADDRESS


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    receiver.delay = 4  # longer than the suite's SMSD_STATUS_CALLBACK_TIMEOUT (2 s)
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    started = time.monotonic()
    assert StatusCallbackDeliverer(db, migrated).run() == {"retrying": 1}
    assert time.monotonic() - started < 3.5
    with db.transaction() as session:
        attempt = session.scalars(select(StatusCallbackAttempt)).one()
    assert attempt.error == "timeout"


def test_a_second_run_in_the_same_process_does_nothing_while_the_first_is_running(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    receiver.delay = 1
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    deliverer = StatusCallbackDeliverer(db, migrated)
    first = threading.Thread(target=deliverer.run)
    first.start()
    wait_until(lambda: len(receiver.received) == 1, 10, "the first run POSTing")
    assert deliverer.run() == {}
    first.join()
    assert receiver.statuses(sid) == ["sending"]


def test_a_deliverer_that_died_after_taking_a_callback_loses_it_to_the_next_when_its_lease_ends(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    with db.transaction() as session:
        [taken] = claim_due(session, migrated, utcnow())  # ...and never POSTed nor recorded
    deliverer = StatusCallbackDeliverer(db, migrated)
    deliverer.run()
    assert receiver.received == []  # leased: nobody else takes it meanwhile
    with db.transaction() as session:
        session.execute(
            update(StatusCallback)
            .where(StatusCallback.id == taken.id)
            .values(leased_until=utcnow() - timedelta(seconds=1))
        )
    deliverer.run()
    assert receiver.statuses(sid) == ["sending"]
    assert receiver.bodies()[0]["attempt"] == 2


def test_after_a_rotation_both_secrets_sign_until_the_overlap_ends(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    verify = readme_verify()
    old = _secret(db, demo)
    with db.transaction() as session:
        new = rotate_secret(session, demo.account_id, utcnow())
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    _deliver_until(StatusCallbackDeliverer(db, migrated), lambda: len(receiver.received) == 1)
    signed = receiver.received[0]
    assert verify(new, signed.headers[SIGNATURE_HEADER], signed.body)
    assert verify(old, signed.headers[SIGNATURE_HEADER], signed.body)

    no_overlap = migrated.model_copy(update={"webhook_secret_overlap": timedelta(0)})
    _move(db, sid, "sent")
    _deliver_until(StatusCallbackDeliverer(db, no_overlap), lambda: len(receiver.received) == 2)
    later = receiver.received[1]
    assert verify(new, later.headers[SIGNATURE_HEADER], later.body)
    assert not verify(old, later.headers[SIGNATURE_HEADER], later.body)


def test_one_slow_message_does_not_hold_back_another_messages_callbacks(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    stuck = accept_message(db, migrated, utcnow(), status_callback=receiver.url("/stuck"))
    free = accept_message(db, migrated, utcnow(), status_callback=receiver.url("/free"))
    receiver.answer = lambda got: 500 if got.path == "/stuck" else 200
    _move(db, stuck, "sending", "sent")
    _move(db, free, "sending", "sent")
    _deliver_until(
        StatusCallbackDeliverer(db, migrated),
        lambda: receiver.statuses(free) == ["sending", "sent"],
    )
    assert set(receiver.statuses(stuck)) == {"sending"}  # its second waits for its first


def test_callback_runs_go_to_the_bulk_and_callbacks_lanes_never_to_the_realtime_one(
    migrated: Settings,
) -> None:
    queue = callbacks_queue(migrated)
    assert celery_config(migrated)["task_routes"][STATUS_CALLBACKS_TASK] == {"queue": queue}
    assert queue not in lane_queues(migrated, "realtime")
    for lane in ("bulk", "callbacks", "all"):
        assert queue in lane_queues(migrated, lane)


def test_the_embedded_sqlite_default_queues_and_delivers_callbacks_too(
    migrated: Settings, tmp_path: Path, receiver: Receiver
) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/embedded.db"
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "migrate"],
        check=True,
        cwd=README.parent,
        env={**os.environ, "SMSD_DATABASE_URL": sqlite_url},
        capture_output=True,
        timeout=120,
    )
    embedded = migrated.model_copy(update={"database_url": sqlite_url})
    db = Database(embedded)
    try:
        create_demo(db)
        sid = accept_message(db, embedded, utcnow(), status_callback=receiver.url())
        _move(db, sid, "sending", "sent")
        _deliver_until(StatusCallbackDeliverer(db, embedded), lambda: len(receiver.received) == 2)
        assert receiver.statuses(sid) == ["sending", "sent"]
    finally:
        db.dispose()


def test_a_group_of_receipts_that_moves_a_message_twice_in_one_write_reports_both_moves(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending")
    reports = [
        StatusReport(MessageStatus.SENT, "callback", "simulator", provider_message_id="SIM1"),
        StatusReport(MessageStatus.DELIVERED, "callback", "simulator", provider_message_id="SIM1"),
    ]
    with db.transaction() as session:
        targets = callback_targets(session, [sid])
        applied = apply_status_batch(
            session,
            [StatusMove(sid, report, f"k{i}") for i, report in enumerate(reports)],
            targets,
            utcnow(),
        )
    assert applied == [True, True]
    _deliver_until(StatusCallbackDeliverer(db, migrated), lambda: len(receiver.received) == 3)
    assert receiver.statuses(sid) == ["sending", "sent", "delivered"]


def test_one_run_delivers_a_burst_of_changes_one_after_the_other_not_one_per_interval(
    db: Database, demo: Demo, migrated: Settings, receiver: Receiver
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback=receiver.url())
    _move(db, sid, "sending", "sent", "delivered")
    assert StatusCallbackDeliverer(db, migrated).run() == {"delivered": 3}
    assert receiver.statuses(sid) == ["sending", "sent", "delivered"]
