"""Guessing application keys is throttled per client address, in one process or across many."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from shared.core.settings import Settings
from tests.api.test_soap import soap_request
from tests.support.api import UNAUTHORIZED_BODY, V3
from tests.support.data import Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.services import free_port

WRONG = headers(key="0" * 24)
SOAP = "/interact/version/2/agent/soap"
LIMIT = 20
THROTTLED = (
    "Too many requests with missing or wrong credentials from this address; retry after {} seconds"
)


def forwarded(address: str, **extra: str) -> dict[str, str]:
    """As a load balancer at 127.0.0.1 forwards a request from `address`."""
    return {"X-Forwarded-For": f"203.0.113.250, {address}", **extra}


@contextmanager
def app_client(
    settings: Settings, *, redis: bool = True, block: float = 30
) -> Iterator[TestClient[Litestar]]:
    from api.app import create_app

    changed = settings.model_copy(
        update={
            "redis_url": settings.redis_url if redis else None,
            "auth_block_time": timedelta(seconds=block),
        }
    )
    with TestClient(app=create_app(changed)) as client:
        yield client


def report(client: TestClient[Litestar] | httpx.Client, address: str, **h: str) -> httpx.Response:
    return client.get(f"{V3}/reports/deflected-calls", headers={**h, **forwarded(address)})


def guess(client: TestClient[Litestar] | httpx.Client, address: str, times: int) -> list[int]:
    return [report(client, address, **WRONG).status_code for _ in range(times)]


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-memory"])
def test_twenty_wrong_keys_block_the_address_even_for_the_right_key(
    migrated: Settings, demo: Demo, redis: bool
) -> None:
    # No trusted proxy here: the forwarded address is ignored and the peer is the client
    # (other addresses are tested with real processes behind a "load balancer" below).
    with app_client(migrated, redis=redis) as client:
        assert guess(client, "198.51.100.7", LIMIT) == [401] * LIMIT

        blocked = report(client, "198.51.100.7", **WRONG)
        right_key = report(client, "198.51.100.7", **headers())

    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 30
    assert blocked.text == THROTTLED.format(blocked.headers["retry-after"])
    # The right key too: otherwise a different answer would tell the guesser it was right.
    assert right_key.status_code == 429


def test_the_block_ends_after_the_block_time(migrated: Settings, demo: Demo) -> None:
    with app_client(migrated, block=1) as client:
        guess(client, "x", LIMIT)
        assert report(client, "x", **headers()).status_code == 429
        time.sleep(1.2)

        assert report(client, "x", **headers()).status_code == 200
        assert report(client, "x", **WRONG).json() == UNAUTHORIZED_BODY


def test_soap_guesses_count_and_are_answered_with_a_fault(migrated: Settings, demo: Demo) -> None:
    with app_client(migrated) as client:
        for _ in range(LIMIT):
            response = client.post(SOAP, headers=WRONG, content=soap_request())
            assert response.status_code == 500
            assert "0x7000000" in response.text

        blocked = client.post(SOAP, headers=headers(), content=soap_request())

    assert blocked.status_code == 429
    assert "<faultcode>SOAP-ENV:Client</faultcode>" in blocked.text
    assert "Too many requests with missing or wrong credentials" in blocked.text
    assert blocked.headers["retry-after"]


@pytest.fixture
def two_apis(
    migrated: Settings, spawn: Callable[..., Process]
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two real API processes on one Redis, behind a 'load balancer' at 127.0.0.1."""
    clients = []
    processes = []
    for _ in range(2):
        port = free_port()
        env = {
            "SMSD_API_PORT": str(port),
            "SMSD_TRUSTED_PROXY_HEADER": "X-Forwarded-For",
            "SMSD_TRUSTED_PROXIES": "127.0.0.1,::1",
        }
        processes.append(spawn("api-guard", "api", env=env))
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        clients.append(client)

        def ready(client: httpx.Client = client) -> bool:
            try:
                return client.get("/health/live").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "an API process")
    yield clients[0], clients[1]
    for client in clients:
        client.close()
    for process in processes:
        process.stop()


def test_failures_are_counted_and_blocked_across_processes(
    demo: Demo, two_apis: tuple[httpx.Client, httpx.Client]
) -> None:
    first, second = two_apis
    attacker = "198.51.100.66"

    # Half the guesses through each process: only a shared count reaches the limit.
    assert guess(first, attacker, LIMIT // 2) == [401] * (LIMIT // 2)
    assert guess(second, attacker, LIMIT // 2) == [401] * (LIMIT // 2)

    assert report(second, attacker, **headers()).status_code == 429
    # The other process heard of the block (published, so within moments).
    wait_until(lambda: report(first, attacker, **headers()).status_code == 429, 5, "the block")
    # Everyone else, the same account included, is served as before.
    assert report(first, "198.51.100.67", **headers()).status_code == 200
    assert report(second, "198.51.100.67", **headers()).status_code == 200
    # Only the right-most address the proxy wrote counts: a forged left part changes nothing.
    spoofed = {"X-Forwarded-For": f"198.51.100.99, {attacker}"}
    assert (
        second.get(f"{V3}/reports/deflected-calls", headers={**headers(), **spoofed}).status_code
        == 429
    )


def test_a_process_started_later_knows_the_blocks_in_force(migrated: Settings, demo: Demo) -> None:
    with app_client(migrated) as first:
        guess(first, "z", LIMIT)
        with app_client(migrated) as later:
            wait_until(lambda: report(later, "z", **headers()).status_code == 429, 5, "the block")
