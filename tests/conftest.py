"""Fixtures: a real PostgreSQL and Redis (throwaway, or TEST_DATABASE_URL / TEST_REDIS_URL),
the schema built by Alembic, and real API, worker and simulator processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import text

from shared.core.db import Database
from shared.core.models import Base
from shared.core.settings import Settings, get_settings
from simulator.tls import ensure_certificate
from tests.support.data import Demo, create_demo
from tests.support.processes import ROOT, Process, answers, wait_until
from tests.support.receiver import Receiver, receiving
from tests.support.services import free_port, postgres_server, redis_server


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def ports() -> dict[str, int]:
    return {"api": free_port(), "simulator": free_port(), "simulator_tls": free_port()}


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    redis_url: str,
    ports: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Settings]:
    """The suite's settings, also exported as SMSD_* so every child process shares them."""
    tls_dir = tmp_path_factory.mktemp("simulator-tls")
    ensure_certificate(tls_dir)
    env = {
        "SMSD_DATABASE_URL": database_url,
        "SMSD_BROKER_URL": redis_url,
        "SMSD_PUBLIC_BASE_URL": f"http://127.0.0.1:{ports['api']}",
        "SMSD_API_PORT": str(ports["api"]),
        "SMSD_SIMULATOR_PORT": str(ports["simulator"]),
        "SMSD_SIMULATOR_URL": f"http://127.0.0.1:{ports['simulator']}",
        "SMSD_SIMULATOR_TLS_PORT": str(ports["simulator_tls"]),
        "SMSD_SIMULATOR_TLS_DIR": str(tls_dir),
        # The workers' provider SDKs trust the simulator's certificate besides the public ones.
        "SMSD_PROVIDER_CA_FILE": str(tls_dir / "bundle.pem"),
        "SMSD_SIMULATOR_LATENCY": "0.01",
        "SMSD_SIMULATOR_DELIVERY_DELAY": "0.05",
        "SMSD_LOG_JSON": "true",
        "SMSD_LOG_LEVEL": "INFO",
        # Short bounds so crash-recovery tests run in seconds, not minutes.
        "SMSD_SEND_LEASE": "3",
        "SMSD_SWEEP_INTERVAL": "1",
        "SMSD_SWEEP_UNPUBLISHED_AFTER": "1",
        "SMSD_RETRY_BACKOFF_BASE": "0.2",
        "SMSD_RETRY_BACKOFF_MAX": "1",
        # A small bulk window (ten tasks of ten), so a few hundred recipients make a backlog,
        # and no cap on the lane's rate (tests/shared/messages/test_lanes.py tests the cap).
        "SMSD_BULK_LANE_DEPTH": "100",
        "SMSD_BULK_TASK_SIZE": "10",
        "SMSD_BULK_LANE_RATE": "0",
        # Status callbacks reach the tests' receivers on loopback, and retry within seconds.
        "SMSD_STATUS_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "SMSD_STATUS_CALLBACK_BACKOFF_BASE": "0.2",
        "SMSD_STATUS_CALLBACK_BACKOFF_MAX": "1",
        "SMSD_STATUS_CALLBACK_TIMEOUT": "2",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield get_settings()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def migrated(settings: Settings) -> Settings:
    """The schema exactly as `alembic upgrade head` builds it (never create_all)."""
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "migrate"], check=True, cwd=ROOT, env=os.environ.copy()
    )
    return settings


@pytest.fixture
def db(migrated: Settings, redis_url: str) -> Iterator[Database]:
    """A database emptied after each test, and an empty broker."""
    database = Database(migrated)
    redis.Redis.from_url(redis_url).flushdb()
    yield database
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with database.transaction() as session:
        session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    database.dispose()


@pytest.fixture
def demo(db: Database) -> Demo:
    """The seed's account with campaign1 on the simulator, and a second account beside it."""
    return create_demo(db)


@pytest.fixture
def client(migrated: Settings, db: Database) -> Iterator[TestClient[Litestar]]:
    """The API in-process, publishing to the real Redis."""
    from api.app import create_app

    with TestClient(app=create_app(migrated)) as test_client:
        yield test_client


# Real processes for end-to-end tests


@pytest.fixture(scope="session")
def spawn(
    migrated: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Process]]:
    """Start `sms-dispatch <args>` as a child process; every one is stopped at the end."""
    started: list[Process] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> Process:
        log = logs / f"{name}-{len(started)}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
        process = Process(name, popen, log)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def simulator_url(migrated: Settings, spawn: Callable[..., Process]) -> str:
    process = spawn("simulator", "simulator")
    wait_until(lambda: answers(f"{migrated.simulator_url}/health"), 30, "the simulator")
    assert process.popen.poll() is None
    return migrated.simulator_url


@pytest.fixture
def simulator(simulator_url: str) -> Iterator[httpx.Client]:
    """The simulator, emptied and back to its defaults for each test."""
    with httpx.Client(base_url=simulator_url) as sim:
        sim.delete("/messages")
        sim.post(
            "/control", json={"latency_ms": 10, "failure_rate": 0, "permanent_failure_rate": 0}
        )
        yield sim


@pytest.fixture(scope="session")
def api_url(migrated: Settings, spawn: Callable[..., Process]) -> str:
    process = spawn("api", "api")
    wait_until(lambda: answers(f"{migrated.public_base_url}/health/ready"), 30, "the API")
    assert process.popen.poll() is None
    return migrated.public_base_url


@pytest.fixture
def start_worker(spawn: Callable[..., Process]) -> Iterator[Callable[..., Process]]:
    """Start real Celery worker processes for one test; they are stopped after it."""
    workers: list[Process] = []

    def start(
        *extra: str, beat: bool = True, concurrency: int = 8, env: dict[str, str] | None = None
    ) -> Process:
        args = ["worker", "-c", str(concurrency), *(["--beat"] if beat else []), *extra]
        process = spawn("worker", *args, env=env)
        workers.append(process)
        wait_until(
            lambda: "ready" in process.output() or process.popen.poll() is not None, 30, "worker"
        )
        assert process.popen.poll() is None, process.output()
        return process

    yield start
    for process in workers:
        process.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A caller's statusCallback endpoint on loopback, for one test (tests/support/receiver.py)."""
    with receiving() as started:
        yield started
