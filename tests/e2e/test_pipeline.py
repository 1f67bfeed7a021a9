"""End to end through real processes: the HTTP API, Celery workers on Redis, the simulator."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from shared.core.db import Database
from shared.core.models import DeflectedCall, Message, utcnow
from shared.core.settings import Settings
from tests.support.data import CALLER, CALLER_E164, TENANT, Demo, headers
from tests.support.messages import accept_message
from tests.support.processes import Process, wait_until

BASE = f"/interact/version/3/account/{TENANT}/resources"


def _token(api: httpx.Client) -> str:
    response = api.post(f"{BASE}/token", headers=headers(), json={"callerId": CALLER})
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def _send(api: httpx.Client, token: str) -> str:
    response = api.post(
        f"{BASE}/campaign/sms/campaign1",
        headers=headers(Accept="application/json"),
        json={"callerId": CALLER, "jpToken": token, "additionalParams": "var1=value1"},
    )
    assert response.status_code == 200, response.text
    sid: str = response.json()["messageSid"]
    return sid


def _statuses(db: Database) -> Counter[str]:
    with db.transaction() as session:
        return Counter(session.scalars(select(Message.status)))


def _handset_messages(simulator: httpx.Client) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = simulator.get("/messages").json()
    return messages


@pytest.fixture
def api(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=10)


def test_a_sent_sms_is_delivered_and_marks_the_call_sms_sent(
    api: httpx.Client,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    worker = start_worker()
    token = _token(api)
    sid = _send(api, token)

    def delivered() -> bool:
        view = api.get(f"{BASE}/messages/{sid}", headers=headers()).json()
        return bool(view["status"] == "delivered")

    wait_until(delivered, 30, "the message to be delivered")
    report = api.get(f"{BASE}/reports/deflected-calls", headers=headers()).json()
    assert [(r["jpToken"], r["smsSent"], r["messageSid"]) for r in report] == [(token, True, sid)]
    assert report[0]["smsDeliveredAt"] is not None
    [handset] = _handset_messages(simulator)
    assert handset["idempotencyKey"] == sid
    assert handset["to"] == CALLER_E164
    assert f"startedFromSmsToken={token}" in handset["body"]
    # Every worker log line about the message names it, its account and its campaign.
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    about_message = [line for line in lines if line.get("messageSid") == sid]
    assert about_message
    assert all(
        line.get("account") == TENANT and line.get("campaign") == "campaign1"
        for line in about_message
        if line["event"].startswith(("message.", "send."))
    )


def test_a_worker_killed_mid_batch_loses_nothing_and_sends_nothing_twice(
    api: httpx.Client,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"latency_ms": 400})
    token = _token(api)
    sids = [_send(api, token) for _ in range(60)]
    # The sends published within one window share a task: eight provider calls in flight at
    # most, so the kill lands while most of the batch waits.
    first = start_worker(concurrency=8, env={"SMSD_WORKER_SEND_THREADS": "8"})
    wait_until(lambda: len(_handset_messages(simulator)) >= 8, 30, "the batch to be under way")
    first.stop(signal.SIGKILL)
    assert len(_handset_messages(simulator)) < len(sids), "the kill must land mid-batch"

    simulator.post("/control", json={"latency_ms": 10})
    start_worker(concurrency=8)
    wait_until(lambda: _statuses(db)["delivered"] == len(sids), 90, "every message delivered")
    per_sid = Counter(m["idempotencyKey"] for m in _handset_messages(simulator))
    assert per_sid == Counter(dict.fromkeys(sids, 1))


def test_a_message_committed_but_never_published_is_sent_by_the_sweeper(
    api_url: str,  # receives the delivery callback
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    # The API's process died between commit and publish: the row exists, the queue is empty.
    sid = accept_message(db, migrated, utcnow() - timedelta(seconds=5), with_token=False)
    start_worker()
    wait_until(lambda: _statuses(db)["delivered"] == 1, 30, "the sweeper to send it")
    [handset] = _handset_messages(simulator)
    assert handset["idempotencyKey"] == sid


def test_transient_provider_failures_are_retried_until_every_message_is_sent(
    api: httpx.Client,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"failure_rate": 0.5})
    token = _token(api)
    sids = [_send(api, token) for _ in range(10)]
    # Enough attempts that a coin-flip provider cannot exhaust them (0.5**40). Its failures
    # open the circuit breaker now and then: a short pause, so the retries (not the breaker's
    # default 30 s cooldown) are what this measures.
    start_worker(env={"SMSD_MAX_SEND_ATTEMPTS": "40", "SMSD_BREAKER_COOLDOWN": "2"})
    wait_until(lambda: _statuses(db)["delivered"] == len(sids), 60, "every message delivered")
    stats = simulator.get("/stats").json()
    assert stats["requests"] > len(sids)  # some sends failed and were retried
    per_sid = Counter(m["idempotencyKey"] for m in _handset_messages(simulator))
    assert per_sid == Counter(dict.fromkeys(sids, 1))
    with db.transaction() as session:
        assert session.scalar(select(func.count()).where(DeflectedCall.sms_sent.is_(True))) == 1


def test_a_permanent_provider_error_fails_the_message_at_once_with_the_provider_code(
    api: httpx.Client,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"permanent_failure_rate": 1.0})
    sid = _send(api, _token(api))
    start_worker()
    wait_until(lambda: _statuses(db)["failed"] == 1, 30, "the message to fail")
    with db.transaction() as session:
        message = session.get_one(Message, sid)
        assert (message.error_code, message.attempts) == ("21211", 1)
        assert session.scalar(select(DeflectedCall.sms_sent)) is False
    assert simulator.get("/stats").json()["requests"] == 1
