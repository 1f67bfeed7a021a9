"""The realtime and bulk lanes end to end: the HTTP API, real Celery workers of each lane on
Redis, and the simulator. The suite runs with a bulk window of 100 messages in tasks of 10
(tests/conftest.py), so a few hundred recipients make a backlog."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message
from shared.core.settings import Settings
from tests.support.data import OTHER_KEY, OTHER_TENANT, TENANT, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.providers import use_providers

# A bulk worker that sends one message at a time: a batch of a few hundred drains for seconds.
SLOW_BULK = {"SMSD_WORKER_SEND_THREADS": "1"}


@pytest.fixture
def api(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=30)


def _bulk(api: httpx.Client, db: Database, count: int, *, other: bool = False) -> set[str]:
    """A bulk batch of `count` recipients (the demo tenant's, or the other tenant's); its sids."""
    tenant, auth, campaign = (
        (OTHER_TENANT, headers(OTHER_TENANT, OTHER_KEY), "other-campaign")
        if other
        else (TENANT, headers(), "campaign1")
    )
    rows = [{"callerId": f"+9725444{n:05d}"} for n in range(count)]
    url = f"/interact/version/3/account/{tenant}/resources/campaign/sms/{campaign}/bulk"
    response = api.post(url, headers=auth, json=rows)
    assert response.status_code == 202, response.text
    with db.transaction() as session:
        query = select(Message.sid).where(Message.batch_id == response.json()["batchId"])
        return set(session.scalars(query))


def _single(api: httpx.Client) -> str:
    """A Send SMS v3 of the demo campaign (a new call's jpToken); its messageSid."""
    base = f"/interact/version/3/account/{TENANT}/resources"
    caller = "+972544696388"
    issued = api.post(f"{base}/token", headers=headers(), json={"callerId": caller})
    assert issued.status_code == 200, issued.text
    body = {"callerId": caller, "jpToken": issued.json()["jpToken"]}
    response = api.post(f"{base}/campaign/sms/campaign1", headers=headers(), json=body)
    assert response.status_code == 200, response.text
    return response.text.rsplit("messageSid: ", 1)[1].strip()


def _arrivals(simulator: httpx.Client, provider: str | None = None) -> list[dict[str, Any]]:
    params = {"provider": provider} if provider else None
    messages: list[dict[str, Any]] = simulator.get("/messages", params=params).json()
    return messages


def _arrived_at(simulator: httpx.Client) -> dict[str, datetime]:
    return {
        m["idempotencyKey"]: datetime.fromisoformat(m["createdAt"]) for m in _arrivals(simulator)
    }


def _each_once(simulator: httpx.Client) -> None:
    received = Counter(m["idempotencyKey"] for m in _arrivals(simulator))
    assert set(received.values()) == {1}, received.most_common(3)


def test_realtime_workers_send_single_sends_and_leave_the_bulk_lane_alone(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    start_worker("--lane", "realtime")
    bulk = _bulk(api, db, 200)

    singles = {_single(api) for _ in range(3)}

    wait_until(lambda: singles <= set(_arrived_at(simulator)), 30, "the single sends")
    # A bulk backlog of 200 waits on its own lane: no realtime worker took any of it.
    assert not bulk & set(_arrived_at(simulator))
    start_worker("--lane", "bulk", beat=False)
    wait_until(lambda: bulk <= set(_arrived_at(simulator)), 90, "the bulk batch, by its lane")
    _each_once(simulator)


def test_single_sends_overtake_a_bulk_batch_that_is_draining(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    start_worker("--lane", "realtime")
    start_worker("--lane", "bulk", beat=False, concurrency=1, env=SLOW_BULK)
    bulk = _bulk(api, db, 300)
    wait_until(lambda: bool(bulk & set(_arrived_at(simulator))), 30, "the bulk batch draining")

    singles = {_single(api) for _ in range(3)}

    wait_until(lambda: singles <= set(_arrived_at(simulator)), 30, "the single sends")
    arrived = _arrived_at(simulator)
    last_single = max(arrived[sid] for sid in singles)
    before = sum(1 for sid in bulk if sid in arrived and arrived[sid] < last_single)
    # Sent while the batch was still draining, not after it.
    assert before < len(bulk), before
    wait_until(lambda: bulk <= set(_arrived_at(simulator)), 120, "the rest of the batch")
    _each_once(simulator)


def test_a_tenants_small_batch_is_not_held_behind_another_tenants_large_one(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    large = _bulk(api, db, 400)
    small = _bulk(api, db, 30, other=True)

    start_worker("--lane", "bulk", concurrency=1, env=SLOW_BULK)

    wait_until(lambda: small <= set(_arrived_at(simulator)), 90, "the small batch")
    arrived = _arrived_at(simulator)
    small_done = max(arrived[sid] for sid in small)
    large_before = sum(1 for sid in large if sid in arrived and arrived[sid] <= small_done)
    # Turn about, task by task: the small batch is done after about a window (100) and as many
    # of the large one's as its own (30), not after all 400 it was stored behind.
    assert large_before < len(large) // 2, large_before
    wait_until(lambda: large <= set(_arrived_at(simulator)), 120, "the large batch")
    _each_once(simulator)


def test_a_sender_limit_holds_across_both_lanes(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    per_second = 5
    use_providers(db, migrated, ["twilio"], sender_rate=per_second)
    bulk = _bulk(api, db, 10)
    singles = {_single(api) for _ in range(10)}
    start_worker("--lane", "realtime")
    start_worker("--lane", "bulk", beat=False)

    everything = bulk | singles
    # (Twilio's API takes no idempotency key: the messages are counted, not matched by sid.)
    wait_until(
        lambda: len(_arrivals(simulator, "twilio")) >= len(everything), 60, "every message sent"
    )
    times = sorted(datetime.fromisoformat(m["createdAt"]) for m in _arrivals(simulator, "twilio"))
    assert len(times) == len(everything)
    assert Counter(m["to"] for m in _arrivals(simulator, "twilio"))["+972544696388"] == 10
    # Evenly spaced across both lanes: n sends take at least (n - 1) / rate seconds in all, and
    # no second holds more than the rate, give or take two late arrivals (as in
    # tests/e2e/test_providers.py). Two lanes limiting on their own would double it.
    assert (times[-1] - times[0]).total_seconds() >= (len(times) - 1) / per_second * 0.95
    busiest = max(
        sum(1 for t in times if start <= t < start + timedelta(seconds=1)) for start in times
    )
    assert busiest <= per_second + 2


def test_the_bulk_lanes_rate_holds_end_to_end(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    # The suite's API runs uncapped: its pump after the 202 puts one window (100) on the queue.
    # The worker's pumps, capped at 20/s in Redis, must let the rest out at that rate.
    per_second = 20
    bulk = _bulk(api, db, 160)
    start_worker("--lane", "bulk", env={"SMSD_BULK_LANE_RATE": str(per_second)})

    wait_until(lambda: bulk <= set(_arrived_at(simulator)), 60, "the whole batch")
    times = sorted(_arrived_at(simulator).values())
    capped = times[100:]
    # 60 messages at 20/s take about 3 s (uncapped, well under one); tasks of 2 (a tenth of
    # a second's worth), so a second holds at most the rate and a task's worth of slack.
    assert (capped[-1] - capped[0]).total_seconds() >= (len(capped) - 1) / per_second * 0.9
    busiest = max(
        sum(1 for t in capped if start <= t < start + timedelta(seconds=1)) for start in capped
    )
    assert busiest <= per_second + 4
    _each_once(simulator)
