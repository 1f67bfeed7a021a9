"""Provider behaviour end to end: real worker processes, real SDKs, the simulator server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message, utcnow
from shared.core.settings import Settings
from tests.support.data import Demo
from tests.support.messages import accept_message
from tests.support.processes import Process, wait_until
from tests.support.providers import use_providers


def _statuses(db: Database) -> Counter[str]:
    with db.transaction() as session:
        return Counter(session.scalars(select(Message.status)))


def _handset(simulator: httpx.Client, provider: str) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = simulator.get(
        "/messages", params={"provider": provider}
    ).json()
    return messages


def test_an_outage_of_the_primary_ends_with_every_message_delivered_by_the_secondary(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["twilio", "vonage"])
    simulator.post("/control", json={"outage": ["twilio"]})
    sids = [accept_message(db, migrated, utcnow(), with_token=False) for _ in range(10)]
    start_worker()
    wait_until(lambda: _statuses(db)["delivered"] == len(sids), 60, "every message delivered")
    assert _handset(simulator, "twilio") == []
    # None sent twice: one handset message per messageSid (Vonage echoes it as client-ref).
    assert Counter(m["clientRef"] for m in _handset(simulator, "vonage")) == Counter(
        dict.fromkeys(sids, 1)
    )
    with db.transaction() as session:
        assert set(session.scalars(select(Message.provider))) == {"vonage"}


def test_a_message_past_its_validity_is_expired_without_a_provider_call(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    # Accepted longer ago than SMSD_MESSAGE_VALIDITY, never sent (a long outage, say).
    long_ago = utcnow() - migrated.message_validity - timedelta(minutes=1)
    sid = accept_message(db, migrated, long_ago, with_token=False)
    start_worker()  # its sweeper publishes the forgotten message; the task expires it
    wait_until(lambda: _statuses(db)["expired"] == 1, 30, "the message to expire")
    assert simulator.get("/stats").json()["requests"] == 0
    with db.transaction() as session:
        assert session.get_one(Message, sid).attempts == 0


def test_a_sender_limit_holds_across_two_worker_processes(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    per_second = 5
    use_providers(db, migrated, ["twilio"], sender_rate=per_second)
    count = 20
    for _ in range(count):
        accept_message(db, migrated, utcnow(), with_token=False)
    start_worker(concurrency=8)
    start_worker(concurrency=8, beat=False)
    wait_until(lambda: len(_handset(simulator, "twilio")) == count, 60, "every message sent")
    times = sorted(datetime.fromisoformat(m["createdAt"]) for m in _handset(simulator, "twilio"))
    span = (times[-1] - times[0]).total_seconds()
    # Evenly spaced sends: n sends take at least (n - 1) / rate seconds in all...
    assert span >= (count - 1) / per_second * 0.95
    # ...and no one-second window holds more than the rate, give or take two sends: the simulator
    # stamps arrival, not the slot the limiter booked, and on a loaded CI box a send can reach it
    # a slot or more late and land beside the next one (seen once in make test: 7 in a second).
    # Two workers limiting on their own would put about twice the rate in every second.
    busiest = max(
        sum(1 for t in times if start <= t < start + timedelta(seconds=1)) for start in times
    )
    assert busiest <= per_second + 2
