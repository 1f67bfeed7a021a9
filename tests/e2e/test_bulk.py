"""Bulk send end to end: the HTTP API, a Celery worker on Redis and the simulator."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from shared.core.db import Database
from shared.core.models import Message
from tests.support.data import TENANT, Demo, headers
from tests.support.processes import Process, wait_until

BASE = f"/interact/version/3/account/{TENANT}/resources"
NUMBERS = [f"+97254469{6300 + i}" for i in range(40)]


@pytest.fixture
def api(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=30)


def _bulk(api: httpx.Client, rows: list[dict[str, Any]]) -> dict[str, Any]:
    response = api.post(f"{BASE}/campaign/sms/campaign1/bulk", headers=headers(), json=rows)
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _progress(api: httpx.Client, batch_id: str) -> dict[str, Any]:
    response = api.get(f"{BASE}/campaign/sms/campaign1/bulk/{batch_id}", headers=headers())
    assert response.status_code == 200, response.text
    progress: dict[str, Any] = response.json()
    return progress


def _unpublished(db: Database) -> int:
    with db.transaction() as session:
        query = select(func.count()).where(Message.published_at.is_(None))
        return int(session.scalar(query) or 0)


def _received(simulator: httpx.Client) -> Counter[str]:
    return Counter(m["idempotencyKey"] for m in simulator.get("/messages").json())


def test_every_recipient_of_a_batch_is_delivered_once(
    api: httpx.Client, demo: Demo, simulator: httpx.Client, start_worker: Callable[..., Process]
) -> None:
    start_worker()
    answer = _bulk(
        api, [{"callerId": n, "additionalParams": f"n={i}"} for i, n in enumerate(NUMBERS)]
    )
    assert answer["accepted"] == len(NUMBERS)

    wait_until(
        lambda: _progress(api, answer["batchId"])["delivered"] == len(NUMBERS),
        60,
        "every recipient delivered",
    )
    received = _received(simulator)
    assert len(received) == len(NUMBERS)
    assert set(received.values()) == {1}
    bodies = {m["to"]: m["body"] for m in simulator.get("/messages").json()}
    assert bodies[NUMBERS[3]].endswith("&n=3")


def test_a_cancelled_batch_sends_nothing_it_had_not_sent(
    api: httpx.Client,
    db: Database,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    # Cancelled before any worker runs: the tasks are on the queue, and find nothing to send.
    answer = _bulk(api, [{"callerId": n} for n in NUMBERS])
    wait_until(lambda: _unpublished(db) == 0, 30, "the batch's tasks on the queue")
    cancelled = api.delete(
        f"{BASE}/campaign/sms/campaign1/bulk/{answer['batchId']}", headers=headers()
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled"] == len(NUMBERS)
    # Published after the batch: once a worker has sent it, it has taken the batch's tasks.
    sentinel = _bulk(api, [{"callerId": NUMBERS[0]}])

    start_worker()
    wait_until(
        lambda: _progress(api, sentinel["batchId"])["delivered"] == 1,
        60,
        "a later batch's message delivered",
    )
    progress = _progress(api, answer["batchId"])
    assert progress["cancelled"] == len(NUMBERS)
    assert progress["queued"] == progress["sent"] == progress["delivered"] == 0
    assert sum(_received(simulator).values()) == 1
