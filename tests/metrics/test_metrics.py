"""Prometheus metrics scraped with real traffic: the API's /metrics (in-process, and several
uvicorn processes in multiprocess mode) and a real worker process's metrics port."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select, update

from shared.db import Database
from shared.models import Message, utcnow
from shared.settings import Settings
from tests.api.support import V3
from tests.conftest import CALLER, TENANT, Demo, Process, headers, issue_token, wait_until
from tests.metrics.support import answers, label_values, sample, scrape, value
from tests.services import free_port
from worker.metrics import BacklogCollector

SEND_ROUTE = "/interact/version/3/account/{account_id}/resources/campaign/sms/{campaign_id}"
SEND_V2_ROUTE = "/interact/version/2/account/{account_id}/resources/campaign/sms/{campaign_id}"
TOKEN_ROUTE = "/interact/version/3/account/{account_id}/resources/token"


def _token(api: httpx.Client) -> str:
    response = api.post(f"{V3}/token", headers=headers(), json={"callerId": CALLER})
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def _send(client: httpx.Client, token: str, **extra: str) -> httpx.Response:
    return client.post(
        f"{V3}/campaign/sms/campaign1",
        headers=headers(**extra),
        json={"callerId": CALLER, "jpToken": token},
    )


def _statuses(db: Database) -> Counter[str]:
    with db.transaction() as session:
        return Counter(session.scalars(select(Message.status)))


# The API


def test_api_counts_requests_by_route_template_and_status(
    client: TestClient[Litestar], demo: Demo
) -> None:
    before = client.get("/metrics").text
    token = issue_token(client)
    accepted = [_send(client, token) for _ in range(3)]
    refused = _send(client, token, **{"Application-Key": "wrong"})
    v2 = client.post(
        f"/interact/version/2/account/{TENANT}/resources/campaign/sms/campaign1",
        headers=headers(),
        json={"callerId": CALLER},
    )
    unknown = client.get("/no/such/page")
    client.get("/metrics")
    after = client.get("/metrics").text

    assert [r.status_code for r in accepted] == [200, 200, 200]
    assert (refused.status_code, v2.status_code, unknown.status_code) == (401, 200, 404)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "smsd_http_requests_total"
    assert delta(requests, method="POST", route=SEND_ROUTE, status="200") == 3
    assert delta(requests, method="POST", route=SEND_ROUTE, status="401") == 1
    assert delta(requests, method="POST", route=SEND_V2_ROUTE, status="200") == 1
    assert delta(requests, method="POST", route=TOKEN_ROUTE, status="200") == 1
    assert delta(requests, method="GET", route="unmatched", status="404") == 1
    assert "/metrics" not in label_values(after, requests, "route")
    # Accept latency: the send endpoints only, by route template and status.
    latency = "smsd_accept_latency_seconds_count"
    assert delta(latency, route=SEND_ROUTE, status="200") == 3
    assert delta(latency, route=SEND_ROUTE, status="401") == 1
    assert delta(latency, route=SEND_V2_ROUTE, status="200") == 1
    assert label_values(after, latency, "route") <= {
        SEND_ROUTE,
        SEND_V2_ROUTE,
        f"{SEND_ROUTE}/callerid/{{caller_id}}",
        "/interact/version/2/agent/soap",
    }


def test_api_metrics_speak_prometheus_text_and_openmetrics(client: TestClient[Litestar]) -> None:
    text = client.get("/metrics")
    openmetrics = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )

    assert text.status_code == 200
    assert text.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE smsd_http_requests_total counter" in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


def test_several_api_processes_add_up_in_multiprocess_mode(
    migrated: Settings, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    port = free_port()
    process = spawn(
        "api-multiprocess",
        "api",
        "--port",
        str(port),
        "--workers",
        "2",
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base}/health/live"), 60, "the API processes")
        before = value(
            scrape(f"{base}/metrics"),
            "smsd_http_requests_total",
            method="GET",
            route="/health/live",
            status="200",
        )
        for _ in range(20):
            assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200  # new connection
        # Whichever process answers the scrape, it reports what all of them answered.
        counts = {
            value(
                scrape(f"{base}/metrics"),
                "smsd_http_requests_total",
                method="GET",
                route="/health/live",
                status="200",
            )
            for _ in range(10)
        }
    finally:
        process.stop()

    assert counts == {before + 20}
    assert list(tmp_path.glob("counter_*.db"))  # the samples went through the shared directory


# Workers


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
    responses = [_send(api, token) for _ in range(5)]
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
    assert sample(exposition, "smsd_oldest_queued_message_age_seconds") == 0
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
    client: TestClient[Litestar], demo: Demo, db: Database, migrated: Settings
) -> None:
    # No worker runs: what the API publishes stays on the queue, its messages `queued`.
    token = issue_token(client)
    sids = [_send(client, token, Accept="application/json").json()["messageSid"] for _ in range(3)]
    with db.transaction() as session:
        session.execute(
            update(Message)
            .where(Message.sid == sids[0])
            .values(created_at=utcnow() - timedelta(minutes=2))
        )
    registry = CollectorRegistry()
    registry.register(BacklogCollector(migrated))

    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send"}) == 3
    assert registry.get_sample_value("smsd_queue_depth", {"queue": "sms.send.sweep"}) == 0
    age = registry.get_sample_value("smsd_oldest_queued_message_age_seconds")
    assert age is not None
    assert 120 <= age < 180


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
