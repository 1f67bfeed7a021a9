"""Readiness checks the database and the broker; without the database a send answers 503 at
once instead of hanging (connect_timeout) or pretending to have accepted anything."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import RequestFactory, TestClient
from sqlalchemy.exc import IntegrityError, OperationalError

from api.app import create_app
from api.errors import database_error_response
from shared.core.db import Database
from shared.core.settings import Settings
from tests.support.api import V3
from tests.support.data import CALLER, Demo, headers
from tests.support.services import free_port

SEND = f"{V3}/campaign/sms/campaign1"
BODY = {"callerId": CALLER, "jpToken": "Aejhib7"}


def dead_database(settings: Settings, port: int) -> Settings:
    return settings.model_copy(
        update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/sms_dispatch"}
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word: a hung database server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def test_ready_when_database_and_broker_answer(client: TestClient[Litestar]) -> None:
    response = client.get("/health/ready")

    assert (response.status_code, response.text) == (200, "ok")


def test_live_does_not_depend_on_anything(migrated: Settings) -> None:
    with TestClient(app=create_app(dead_database(migrated, free_port()))) as client:
        response = client.get("/health/live")

    assert (response.status_code, response.text) == (200, "ok")


@pytest.mark.timeout(60)
def test_not_ready_while_the_database_is_down(migrated: Settings) -> None:
    with TestClient(app=create_app(dead_database(migrated, free_port()))) as client:
        response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.text == "database unavailable: OperationalError"


@pytest.mark.timeout(60)
def test_a_send_answers_503_while_the_database_is_down(migrated: Settings, demo: Demo) -> None:
    with TestClient(app=create_app(dead_database(migrated, free_port()))) as client:
        response = client.post(SEND, headers=headers(), json=BODY)

    assert response.status_code == 503
    assert response.text == "service unavailable"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.timeout(60)
def test_a_database_that_never_answers_makes_a_send_503_not_a_hang(
    migrated: Settings, demo: Demo, silent_port: int
) -> None:
    # The connection is accepted and then nothing: only connect_timeout ends the wait.
    with TestClient(app=create_app(dead_database(migrated, silent_port))) as client:
        send = client.post(SEND, headers=headers(), json=BODY)
        ready = client.get("/health/ready")

    assert (send.status_code, send.text) == (503, "service unavailable")
    assert (ready.status_code, ready.text) == (503, "database unavailable: OperationalError")


@pytest.mark.timeout(60)
def test_not_ready_while_the_redis_broker_is_down(migrated: Settings, db: Database) -> None:
    dead_broker = migrated.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(app=create_app(dead_broker)) as client:
        response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.text == "broker unavailable: ConnectionError"


@pytest.mark.timeout(60)
def test_not_ready_while_both_are_down_names_both(migrated: Settings) -> None:
    both = dead_database(migrated, free_port()).model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    with TestClient(app=create_app(both)) as client:
        response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.text == (
        "database unavailable: OperationalError; broker unavailable: ConnectionError"
    )


@pytest.mark.timeout(60)
def test_other_brokers_are_checked_with_one_connection_attempt(
    migrated: Settings, db: Database, tmp_path: Path
) -> None:
    sql_broker = migrated.model_copy(
        update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"}
    )
    dead_amqp = migrated.model_copy(update={"broker_url": f"amqp://127.0.0.1:{free_port()}//"})
    with TestClient(app=create_app(sql_broker)) as client:
        up = client.get("/health/ready")
    with TestClient(app=create_app(dead_amqp)) as client:
        down = client.get("/health/ready")

    assert (up.status_code, up.text) == (200, "ok")
    assert down.status_code == 503
    assert down.text.startswith("broker unavailable: ")


def test_database_errors_other_than_unavailability_stay_500() -> None:
    request = RequestFactory().post("/")
    integrity = IntegrityError("INSERT", {}, Exception("duplicate key"))
    outage = OperationalError("SELECT 1", {}, Exception("connection refused"))

    assert database_error_response(request, integrity).status_code == 500
    assert database_error_response(request, outage).status_code == 503
