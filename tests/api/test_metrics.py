"""Prometheus metrics scraped with real traffic: the API's /metrics (in-process, and several
uvicorn processes in multiprocess mode)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from litestar import Litestar
from litestar.testing import TestClient

from shared.core.settings import Settings
from tests.support.api import issue_token
from tests.support.data import CALLER, TENANT, Demo, headers
from tests.support.metrics import label_values, scrape, send, value
from tests.support.processes import Process, answers, wait_until
from tests.support.services import free_port

SEND_ROUTE = "/interact/version/3/account/{account_id}/resources/campaign/sms/{campaign_id}"
SEND_V2_ROUTE = "/interact/version/2/account/{account_id}/resources/campaign/sms/{campaign_id}"
TOKEN_ROUTE = "/interact/version/3/account/{account_id}/resources/token"


def test_api_counts_requests_by_route_template_and_status(
    client: TestClient[Litestar], demo: Demo
) -> None:
    before = client.get("/metrics").text
    token = issue_token(client)
    accepted = [send(client, token) for _ in range(3)]
    refused = send(client, token, **{"Application-Key": "wrong"})
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
