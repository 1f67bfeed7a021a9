"""`sms-dispatch worker` sends Celery task events only when SMSD_TASK_EVENTS asks for them: each
is a broker publish per task. A running Flower turns them on by itself, until the workers
restart (tests/worker/test_flower.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import redis
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message
from tests.support.api import V3
from tests.support.data import CALLER, headers
from tests.support.processes import Process, wait_until


def _task_events_while_one_message_is_sent(
    redis_url: str,
    api_url: str,
    db: Database,
    start_worker: Callable[..., Process],
    env: dict[str, str],
) -> list[str]:
    """The task event messages the worker published (their routing keys) while it sent one
    message."""
    broker = redis.Redis.from_url(redis_url)
    events = broker.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    # kombu publishes a fanout exchange's messages to "/{db}.{exchange}/{routing key}".
    events.psubscribe("*celeryev/task.*")
    try:
        start_worker(beat=False, env=env)
        with httpx.Client(base_url=api_url, timeout=10) as api:
            issued = api.post(f"{V3}/token", headers=headers(), json={"callerId": CALLER})
            assert issued.status_code == 200, issued.text
            token = issued.json()["jpToken"]
            response = api.post(
                f"{V3}/campaign/sms/campaign1",
                headers=headers(Accept="application/json"),
                json={"callerId": CALLER, "jpToken": token},
            )
        assert response.status_code == 200, response.text
        sid = response.json()["messageSid"]

        def sent() -> bool:
            with db.transaction() as session:
                found = session.scalar(select(Message.sent_at).where(Message.sid == sid))
                return found is not None

        wait_until(sent, 30, "the message sent")
        seen: list[str] = []
        # The worker publishes task-succeeded just after the task returns: wait a little more.
        until = time.monotonic() + 2
        while time.monotonic() < until:
            message = events.get_message(timeout=0.2)
            if message is not None:
                channel = message["channel"].decode()
                seen.append(channel.rpartition("/")[2])
        return seen
    finally:
        events.close()
        broker.close()


@pytest.mark.usefixtures("demo", "simulator")
def test_a_worker_sends_no_task_events_by_default(
    redis_url: str, api_url: str, db: Database, start_worker: Callable[..., Process]
) -> None:
    assert _task_events_while_one_message_is_sent(redis_url, api_url, db, start_worker, {}) == []


@pytest.mark.usefixtures("demo", "simulator")
def test_a_worker_sends_task_events_when_asked(
    redis_url: str,
    api_url: str,
    db: Database,
    start_worker: Callable[..., Process],
) -> None:
    seen = _task_events_while_one_message_is_sent(
        redis_url, api_url, db, start_worker, {"SMSD_TASK_EVENTS": "true"}
    )
    # A worker sends its task events in bundles ("task.multi"), received and succeeded together.
    assert seen
    assert set(seen) <= {"task.multi", "task.received", "task.started", "task.succeeded"}, seen
