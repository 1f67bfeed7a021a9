"""Status callbacks end to end: the HTTP API, a real Celery worker (its beat runs the
deliverer), the simulator delivering, and a caller's receiver on loopback. Every change of
every message arrives, in order, signed so the README's check accepts it, and the lookup shows
each attempt."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from shared.core.db import Database
from shared.messages.status_callbacks import SIGNATURE_HEADER
from tests.shared.messages.test_status_callbacks import readme_verify
from tests.support.data import TENANT, Demo, headers
from tests.support.metrics import sample, scrape
from tests.support.processes import Process, wait_until
from tests.support.receiver import Receiver
from tests.support.services import free_port

BASE = f"/interact/version/3/account/{TENANT}/resources"
LIFE = ["sending", "sent", "delivered"]


@pytest.fixture
def api(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as client:
        yield client


def _secret(db: Database, demo: Demo) -> str:
    from shared.accounts.webhook_secrets import current_secret
    from shared.core.models import utcnow

    with db.transaction() as session:
        return current_secret(session, demo.account_id, utcnow())


def test_a_single_send_s_status_changes_reach_its_callback_in_order_and_signed(
    api: httpx.Client,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    receiver: Receiver,
    start_worker: Callable[..., Process],
) -> None:
    port = free_port()
    start_worker(env={"SMSD_WORKER_METRICS_PORT": str(port)})
    token = api.post(f"{BASE}/token", headers=headers(), json={"callerId": "+972544696301"})
    sent = api.post(
        f"{BASE}/campaign/sms/campaign1",
        headers=headers(Accept="application/json"),
        json={
            "callerId": "+972544696301",
            "jpToken": token.json()["jpToken"],
            "statusCallback": receiver.url(),
        },
    )
    assert sent.status_code == 200, sent.text
    sid = sent.json()["messageSid"]

    wait_until(lambda: receiver.statuses(sid) == LIFE, 60, "sending, sent, delivered")
    verify = readme_verify()
    secret = _secret(db, demo)
    assert all(verify(secret, r.headers[SIGNATURE_HEADER], r.body) for r in receiver.received)

    def shown() -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = api.get(f"{BASE}/messages/{sid}", headers=headers()).json()[
            "callbacks"
        ]
        return answer

    wait_until(
        lambda: [c["state"] for c in shown()] == ["delivered"] * 3,
        30,
        "the lookup showing the three delivered",
    )
    callbacks = shown()
    assert [c["status"] for c in callbacks] == LIFE
    for callback in callbacks:
        [attempt] = callback["attempts"]
        assert attempt["responseStatus"] == 200
        assert attempt["error"] is None
    # ...and the worker counted them.
    metrics = f"http://127.0.0.1:{port}/metrics"
    delivered = "smsd_status_callback_deliveries_total"
    wait_until(
        lambda: sample(scrape(metrics), delivered, outcome="delivered") == 3,
        30,
        "three deliveries counted",
    )


def test_every_message_of_a_bulk_batch_reports_its_whole_life_in_order(
    api: httpx.Client,
    demo: Demo,
    simulator: httpx.Client,
    receiver: Receiver,
    start_worker: Callable[..., Process],
) -> None:
    start_worker()
    numbers = [f"+97254469{6400 + i}" for i in range(30)]
    batch = api.post(
        f"{BASE}/campaign/sms/campaign1/bulk",
        params={"statusCallback": receiver.url("/bulk")},
        headers=headers(),
        json=[{"callerId": n} for n in numbers],
    )
    assert batch.status_code == 202, batch.text
    batch_id = batch.json()["batchId"]

    def whole() -> bool:
        bodies = receiver.bodies()
        by_sid: dict[str, list[str]] = {}
        for body in bodies:
            by_sid.setdefault(body["messageSid"], []).append(body["status"])
        return len(by_sid) == len(numbers) and all(s == LIFE for s in by_sid.values())

    wait_until(whole, 90, "every message's sending, sent, delivered in order")
    assert {b["batchId"] for b in receiver.bodies()} == {batch_id}
    assert {r.path for r in receiver.received} == {"/bulk"}
