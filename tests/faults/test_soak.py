"""The soak (`make soak`, not part of `make test`): thousands of messages through a real API
and two supervised workers while faults come one after another: Celery worker processes
SIGKILLed, the broker's Redis killed and restarted empty, a provider outage, provider calls
left in doubt. Ends with the ledger, and prints the figures docs/operations.md records.

SMSD_SOAK_MESSAGES (default 3000) and SMSD_SOAK_SEED set its size and its random choices."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from shared.core.db import Database
from shared.core.settings import Settings
from tests.faults.ledger import settle
from tests.faults.redis_control import RedisControl
from tests.faults.test_broker import broker_env, celery_child
from tests.support.data import KEY, TENANT, Demo
from tests.support.processes import Process, wait_until
from tests.support.providers import use_providers
from tests.support.services import free_port

pytestmark = pytest.mark.soak

MESSAGES = int(os.environ.get("SMSD_SOAK_MESSAGES", "3000"))
SEED = int(os.environ.get("SMSD_SOAK_SEED", "20261130"))
# Send SMS v2: the v3 body without a jpToken, so every request is a new message.
SEND_PATH = f"/interact/version/2/account/{TENANT}/resources/campaign/sms/campaign1"


@pytest.fixture
def own_redis() -> Iterator[RedisControl]:
    with RedisControl() as control:
        yield control


def test_soak_under_repeated_faults_loses_nothing_and_sends_nothing_twice(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    own_redis: RedisControl,
) -> None:
    rng = random.Random(SEED)
    use_providers(db, migrated, ["simulator", "twilio"])
    simulator.post("/control", json={"latency_ms": 20}).raise_for_status()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = broker_env(
        own_redis,
        SMSD_PROVIDER_TIMEOUT="1",
        SMSD_IN_DOUBT_LOOKUP_AFTER="2",
        SMSD_RECONCILE_AFTER="5",
        SMSD_BREAKER_COOLDOWN="2",
    )
    # Receipts come to this API: its address is the public one the workers give providers.
    env["SMSD_PUBLIC_BASE_URL"] = base
    api_env = {**env, "SMSD_API_PORT": str(port), "SMSD_AUTH_FAILURE_LIMIT": "1000000"}
    spawn("api-soak", "api", "--port", str(port), env=api_env)
    wait_until(lambda: _answers(base), 30, "the soak API")
    workers = [
        spawn("worker-soak", "worker", "-c", "16", *(["--beat"] if n == 0 else []), env=env)
        for n in range(2)
    ]
    wait_until(lambda: all("ready" in w.output() for w in workers), 60, "the soak workers")

    accepted: list[str] = []
    refused = 0
    lock = threading.Lock()

    def send(count: int) -> None:
        nonlocal refused
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(count):
                response = client.post(
                    SEND_PATH,
                    json={"callerId": "+972544696388"},
                    headers={"Tenant-Id": TENANT, "Application-Key": KEY},
                )
                with lock:
                    if response.status_code == 200:
                        accepted.append(response.text.rsplit(" ", 1)[-1])
                    else:
                        refused += 1

    started = time.monotonic()
    senders = [threading.Thread(target=send, args=(MESSAGES // 4,)) for _ in range(4)]
    for thread in senders:
        thread.start()
    faults: list[str] = []

    def now() -> str:
        return f"{time.monotonic() - started:.0f}s"

    # One fault after another while the traffic flows.
    time.sleep(5)
    for _ in range(2):
        victim = rng.choice(workers)
        os.kill(celery_child(victim), signal.SIGKILL)
        faults.append(f"{now()} SIGKILL of a Celery worker process")
        time.sleep(rng.uniform(3, 6))
    own_redis.kill()
    time.sleep(1)
    own_redis.restart_empty()
    faults.append(f"{now()} Redis SIGKILLed and restarted empty")
    time.sleep(5)
    simulator.post("/control", json={"outage": ["simulator"]}).raise_for_status()
    faults.append(f"{now()} simulator provider outage (20 s; Twilio takes over)")
    time.sleep(20)
    simulator.post("/control", json={"outage": []}).raise_for_status()
    simulator.post(
        "/control", json={"faults": {"twilio": "slow_answer"}, "slow_answer_ms": 1500}
    ).raise_for_status()
    faults.append(f"{now()} Twilio answers after the client's timeout (10 s): sends in doubt")
    time.sleep(10)
    simulator.post("/control", json={"faults": {}}).raise_for_status()
    for thread in senders:
        thread.join(timeout=600)
    accepted_after = time.monotonic() - started

    ledger = settle(db, migrated.simulator_url, accepted, timeout=600)
    settled_after = time.monotonic() - started
    statuses: dict[str, int] = {}
    for status in ledger.statuses.values():
        statuses[status] = statuses.get(status, 0) + 1
    print(
        f"\nsoak: {len(accepted)} accepted (200), {refused} refused, "
        f"all accepted after {accepted_after:.0f} s, all final after {settled_after:.0f} s"
    )
    print("soak: faults: " + "; ".join(faults))
    print(f"soak: statuses: {statuses}")
    print(
        f"soak: received by the provider: {sum(ledger.received.values())} messages, "
        f"{len(ledger.twice())} twice; rows missing for a 200: {len(ledger.missing(accepted))}"
    )
    assert len(accepted) + refused == MESSAGES // 4 * 4


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
