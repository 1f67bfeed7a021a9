"""What status callbacks promise, broken on real processes: a receiver that is down holds no
SMS back and loses no status change; a worker SIGKILLed in the middle of POSTing loses none
either (each change arrives at least once, a message's changes in order).

Each ends with the ledger (tests/faults/ledger.py) for the SMS, and one for the callbacks:
every status change the database holds for a message arrived, in the order it happened."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import StatusCallback
from tests.faults.ledger import settle
from tests.support.data import TENANT, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.receiver import Receiver

BASE = f"/interact/version/3/account/{TENANT}/resources"
LIFE = ["sending", "sent", "delivered"]


@pytest.fixture
def api(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as client:
        yield client


def _send(api: httpx.Client, count: int, callback: str) -> list[str]:
    sids = []
    for i in range(count):
        number = f"+97254469{6500 + i}"
        token = api.post(f"{BASE}/token", headers=headers(), json={"callerId": number}).json()
        sent = api.post(
            f"{BASE}/campaign/sms/campaign1",
            headers=headers(Accept="application/json"),
            json={"callerId": number, "jpToken": token["jpToken"], "statusCallback": callback},
        )
        assert sent.status_code == 200, sent.text
        sids.append(sent.json()["messageSid"])
    return sids


def _first_arrivals(receiver: Receiver) -> dict[str, list[str]]:
    """Each message's statuses in the order they first arrived (a repeat is the same eventId)."""
    seen: set[str] = set()
    by_sid: dict[str, list[str]] = {}
    for body in receiver.bodies():
        if body["eventId"] not in seen:
            seen.add(body["eventId"])
            by_sid.setdefault(body["messageSid"], []).append(body["status"])
    return by_sid


def _outcomes(db: Database) -> list[str | None]:
    with db.transaction() as session:
        return list(session.scalars(select(StatusCallback.outcome)))


def _callback_ledger(db: Database, receiver: Receiver, sids: list[str]) -> None:
    """Every change the database queued was delivered, and arrived in the order it happened."""
    with db.transaction() as session:
        queued = session.execute(
            select(
                StatusCallback.message_sid, StatusCallback.status, StatusCallback.outcome
            ).order_by(StatusCallback.id)
        ).all()
    assert {outcome for _, _, outcome in queued} == {"delivered"}
    expected: dict[str, list[str]] = {}
    for sid, status, _ in queued:
        expected.setdefault(sid, []).append(status)
    assert _first_arrivals(receiver) == expected
    assert all(expected[sid] == LIFE for sid in sids), expected


def test_a_receiver_that_is_down_holds_no_sms_back_and_gets_every_change_when_it_is_back(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    simulator_url: str,
    receiver: Receiver,
    start_worker: Callable[..., Process],
) -> None:
    start_worker()
    receiver.stop()  # connections refused
    sids = _send(api, 10, receiver.url())

    # Every SMS goes out and is delivered while no callback can be: sending never waits.
    ledger = settle(db, simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert receiver.received == []

    receiver.start()
    wait_until(
        lambda: all(_first_arrivals(receiver).get(sid) == LIFE for sid in sids),
        60,
        "every change once the receiver is back",
    )
    wait_until(lambda: set(_outcomes(db)) == {"delivered"}, 30, "every callback recorded")
    _callback_ledger(db, receiver, sids)


def test_a_worker_killed_mid_post_loses_no_change_it_had_taken(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    simulator_url: str,
    receiver: Receiver,
    start_worker: Callable[..., Process],
) -> None:
    receiver.delay = 1.5  # every POST is in flight for a while
    worker = start_worker()
    sids = _send(api, 5, receiver.url())
    wait_until(lambda: len(receiver.received) >= 3, 60, "callbacks in flight")
    worker.stop(signal.SIGKILL)
    in_flight = {body["eventId"] for body in receiver.bodies()}

    receiver.delay = 0
    start_worker()
    settle(db, simulator_url, sids, timeout=90)

    wait_until(
        lambda: _outcomes(db) == ["delivered"] * 3 * len(sids),
        90,
        "every callback delivered after the restart",
    )
    _callback_ledger(db, receiver, sids)
    # What the killed worker had POSTed without hearing the answer was POSTed again.
    arrivals = [body["eventId"] for body in receiver.bodies()]
    assert all(arrivals.count(event) >= 2 for event in in_flight), (in_flight, arrivals)
