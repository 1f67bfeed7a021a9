"""Scheduled sends end to end: the HTTP API, a real Celery worker with its sweeper on Redis,
and the simulator's arrival stamps. Nothing reaches the provider before its sendAt."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from urllib.parse import quote

import httpx
import pytest

from shared.core.models import utcnow
from tests.support.data import TENANT, Demo, headers
from tests.support.processes import Process, wait_until

BASE = f"/interact/version/3/account/{TENANT}/resources"
NUMBERS = [f"+97254469{6300 + i}" for i in range(5)]


@pytest.fixture
def api(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=30)


def _arrived(simulator: httpx.Client) -> dict[str, datetime]:
    return {
        m["idempotencyKey"]: datetime.fromisoformat(m["createdAt"])
        for m in simulator.get("/messages").json()
    }


def test_a_scheduled_send_and_a_scheduled_batch_reach_the_provider_at_their_time_not_before(
    api: httpx.Client,
    demo: Demo,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    start_worker()  # both lanes, with its sweeper (every second in the suite)
    when = utcnow() + timedelta(seconds=4)
    at = when.isoformat()
    token = api.post(f"{BASE}/token", headers=headers(), json={"callerId": NUMBERS[0]}).json()
    single = api.post(
        f"{BASE}/campaign/sms/campaign1",
        headers=headers(Accept="application/json"),
        json={"callerId": NUMBERS[0], "jpToken": token["jpToken"], "sendAt": at},
    )
    assert single.status_code == 200, single.text
    batch = api.post(
        f"{BASE}/campaign/sms/campaign1/bulk?sendAt={quote(at)}",
        headers=headers(),
        json=[{"callerId": n} for n in NUMBERS[1:]],
    )
    assert batch.status_code == 202, batch.text
    sids = {single.json()["messageSid"]}
    progress = f"{BASE}/campaign/sms/campaign1/bulk/{batch.json()['batchId']}"

    wait_until(
        lambda: (
            api.get(progress, headers=headers()).json()["sent"]
            + api.get(progress, headers=headers()).json()["delivered"]
            == len(NUMBERS) - 1
            and sids <= set(_arrived(simulator))
        ),
        60,
        "everything sent",
    )
    arrived = _arrived(simulator)
    assert len(arrived) == len(NUMBERS)
    assert min(arrived.values()) >= when, (min(arrived.values()), when)
