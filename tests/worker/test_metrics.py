"""Prometheus metrics scraped with real traffic: a real worker process's metrics port, and the
backlog gauges it serves."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import httpx
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select, update

from shared.core.db import Database
from shared.core.models import BulkBatch, Message, utcnow
from shared.core.settings import Settings
from shared.messages.outbox import Publisher
from tests.support.api import V3, issue_token, queued_sends
from tests.support.data import CALLER, Demo, headers
from tests.support.messages import accept_message
from tests.support.metrics import label_values, sample, scrape, send, value
from tests.support.processes import Process, answers, wait_until
from tests.support.services import free_port
from worker.metrics import BacklogCollector


def _token(api: httpx.Client) -> str:
    response = api.post(f"{V3}/token", headers=headers(), json={"callerId": CALLER})
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def _statuses(db: Database) -> Counter[str]:
    with db.transaction() as session:
        return Counter(session.scalars(select(Message.status)))


def test_a_worker_process_serves_its_send_counts_and_the_backlog(
    api_url: str,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    api = httpx.Client(base_url=api_url, timeout=10)
    token = _token(api)
    responses = [send(api, token) for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5

    start_worker(env={"SMSD_WORKER_METRICS_PORT": str(port)})
    wait_until(lambda: answers(url), 30, "the worker's metrics port")
    wait_until(lambda: _statuses(db)["delivered"] == 5, 60, "every message delivered")
    sent = "smsd_sends_total"
    wait_until(
        lambda: value(scrape(url), sent, provider="simulator", outcome="sent") == 5,
        10,
        "the worker to count its sends",
    )
    exposition = scrape(url)

    assert value(exposition, sent, provider="simulator", outcome="sent") == 5
    assert label_values(exposition, sent, "outcome") == {"sent"}
    assert value(exposition, "smsd_send_duration_seconds_count", provider="simulator") == 5
    assert sample(exposition, "smsd_queue_depth", queue="sms.send") == 0
    assert sample(exposition, "smsd_queue_depth", queue="sms.send.sweep") is not None
    assert sample(exposition, "smsd_oldest_queued_message_age_seconds", lane="realtime") == 0
    assert sample(exposition, "smsd_oldest_queued_message_age_seconds", lane="bulk") == 0
    assert len(simulator.get("/messages").json()) == 5


def test_a_busy_metrics_port_stops_the_worker_at_start(
    migrated: Settings, spawn: Callable[..., Process]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = spawn("worker-busy-port", "worker", "--metrics-port", str(port))
        returncode = process.popen.wait(timeout=30)

    assert returncode != 0
    assert f"127.0.0.1:{port} is already in use" in process.output()
    assert "SMSD_WORKER_METRICS_PORT" in process.output()


def test_the_backlog_gauges_read_the_broker_and_the_database(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings, redis_url: str
) -> None:
    # No worker runs: what the API publishes stays on the queue, its messages `queued`.
    token = issue_token(client)
    sids = [send(client, token, Accept="application/json").json()["messageSid"] for _ in range(3)]
    with db.transaction() as session:
        session.execute(
            update(Message)
            .where(Message.sid == sids[0])
            .values(created_at=utcnow() - timedelta(minutes=2))
        )
    # The API publishes after the 200, on its publisher's thread: wait until it has.
    Publisher.flush_all()
    registry = CollectorRegistry()
    registry.register(BacklogCollector(migrated))

    # Tasks, not messages: sends within one publish window share a task.
    tasks = queued_sends(redis_url)
    assert sorted(sid for _, args in tasks for sid in _flat(args[0])) == sorted(sids)
    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send"}) == len(tasks)
    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send.sweep"}) == 0
    age = registry.get_sample_value("smsd_oldest_queued_message_age_seconds", {"lane": "realtime"})
    assert age is not None
    assert 120 <= age < 180


def test_the_bulk_lane_has_its_depth_age_and_backlog_per_tenant(
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    # No worker runs: the API's pump put one window on the bulk queue, the rest waits.
    url = "/interact/version/3/account/12345678/resources/campaign/sms/campaign1/bulk"
    rows = [{"callerId": f"+9725444{n:05d}"} for n in range(150)]
    assert client.post(url, headers=headers(), json=rows).status_code == 202
    with db.transaction() as session:
        session.execute(update(BulkBatch).values(created_at=utcnow() - timedelta(minutes=3)))
    registry = CollectorRegistry()
    registry.register(BacklogCollector(migrated))

    # The suite's window: 100 messages in tasks of 10.
    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send.bulk"}) == 10
    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send"}) == 0
    backlog = registry.get_sample_value("smsd_bulk_backlog_messages", {"tenant": "12345678"})
    assert backlog == 150
    assert registry.get_sample_value("smsd_bulk_backlog_messages", {"tenant": "87654321"}) is None
    age = registry.get_sample_value("smsd_oldest_queued_message_age_seconds", {"lane": "bulk"})
    assert age is not None
    assert 180 <= age < 240
    realtime = {"lane": "realtime"}
    assert registry.get_sample_value("smsd_oldest_queued_message_age_seconds", realtime) == 0


def test_the_backlog_gauges_are_left_out_while_their_sources_are_down(
    migrated: Settings,
) -> None:
    dead = migrated.model_copy(
        update={
            "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",
        }
    )
    registry = CollectorRegistry()
    registry.register(BacklogCollector(dead))

    assert generate_latest(registry) == b""  # the scrape itself still succeeds


def _flat(arg: str | list[str]) -> list[str]:
    return [arg] if isinstance(arg, str) else arg


def test_status_callbacks_waiting_are_counted_with_the_oldest_ones_age(
    demo: Demo, db: Database, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), status_callback="https://hooks.example.com/x")
    registry = CollectorRegistry()
    registry.register(BacklogCollector(migrated))
    assert registry.get_sample_value("smsd_status_callbacks_pending") == 0
    assert registry.get_sample_value("smsd_oldest_status_callback_age_seconds") == 0

    with db.transaction() as session:
        session.execute(
            update(Message)
            .where(Message.sid == sid)
            .values(status="sending", updated_at=utcnow() - timedelta(minutes=2))
        )
        session.execute(update(Message).where(Message.sid == sid).values(status="sent"))

    assert registry.get_sample_value("smsd_status_callbacks_pending") == 2
    age = registry.get_sample_value("smsd_oldest_status_callback_age_seconds")
    assert age is not None
    assert 120 <= age < 180
