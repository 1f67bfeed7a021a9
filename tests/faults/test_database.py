"""A stalled database answers 503 within seconds, never a late 200.

A real API process on a PostgreSQL cluster of our own (tests/faults/postgres_control.py), which
we freeze (SIGSTOP of every process of the cluster), crash and restart under it, while callers
keep sending. The broker is the suite's Redis; no worker runs: what matters is what the callers
were told against the rows PostgreSQL holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from sqlalchemy import func, select

from shared.core.db import Database
from shared.core.models import Message
from shared.core.settings import Settings
from tests.faults.ledger import Ledger
from tests.faults.postgres_control import PostgresControl, controlled_postgres
from tests.support.data import CALLER, TENANT, headers
from tests.support.processes import ROOT, Process, wait_until
from tests.support.services import free_port

DEADLINE = 3.0  # SMSD_API_ACCEPT_DEADLINE given to the API under test
# How late a 503 may be past the deadline: scheduling on a busy two-core machine.
MARGIN = 1.5
SEND = f"/interact/version/3/account/{TENANT}/resources/campaign/sms/campaign1"
TOKEN = f"/interact/version/3/account/{TENANT}/resources/token"


@pytest.fixture(scope="module")
def pg(migrated: Settings) -> Iterator[PostgresControl]:
    """Our own cluster, migrated and seeded with the demo account by the CLI."""
    with controlled_postgres() as cluster:
        env = {**os.environ, "SMSD_DATABASE_URL": cluster.url}
        for command in ("migrate", "seed-demo"):
            subprocess.run(
                [sys.executable, "-m", "shared.cli", command],
                check=True,
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=120,
            )
        yield cluster


@pytest.fixture(scope="module")
def rows(pg: PostgresControl, migrated: Settings) -> Iterator[Database]:
    """The test's own view of the cluster (used only while it is running)."""
    database = Database(migrated.model_copy(update={"database_url": pg.url}))
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def api(pg: PostgresControl, spawn: Callable[..., Process]) -> Iterator[str]:
    """One API process for the whole module: recovering must never need a restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn(
        "api-db-faults",
        "api",
        env={
            "SMSD_DATABASE_URL": pg.url,
            "SMSD_API_PORT": str(port),
            "SMSD_PUBLIC_BASE_URL": url,
            "SMSD_API_ACCEPT_DEADLINE": str(DEADLINE),
        },
    )

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, "the API on the controlled PostgreSQL")
    yield url
    assert process.popen.poll() is None, "the API died:\n" + process.output()[-3000:]


@dataclass(frozen=True)
class Answer:
    started: float
    finished: float
    status: int
    text: str
    sid: str | None
    replayed: bool

    @property
    def latency(self) -> float:
        return self.finished - self.started


def send(client: httpx.Client, token: str, key: str | None = None) -> Answer:
    extra = {"Idempotency-Key": key} if key else {}
    started = time.monotonic()
    response = client.post(
        SEND,
        headers=headers(Accept="application/json", **extra),
        json={"callerId": CALLER, "jpToken": token},
    )
    finished = time.monotonic()
    sid = response.json()["messageSid"] if response.status_code == 200 else None
    return Answer(
        started,
        finished,
        response.status_code,
        response.text,
        sid,
        response.headers.get("Idempotency-Replay") == "true",
    )


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    # A generous client timeout: a hang shows up as a slow answer, not as a client error.
    with httpx.Client(base_url=api, timeout=30) as http:
        yield http


@pytest.fixture
def token(client: httpx.Client) -> str:
    response = client.post(TOKEN, headers=headers(), json={"callerId": CALLER})
    assert response.status_code == 200, response.text
    jp_token: str = response.json()["jpToken"]
    return jp_token


def ledger_of(db: Database) -> Ledger:
    with db.transaction() as session:
        result = session.execute(select(Message.sid, Message.status))
        statuses = {sid: status for sid, status in result}
    return Ledger(statuses, Counter())


def rows_with_key(db: Database, key: str) -> int:
    with db.transaction() as session:
        return int(session.scalar(select(func.count()).where(Message.idempotency_key == key)) or 0)


def recover(client: httpx.Client, token: str, since: float, timeout: float = 20) -> float:
    """Seconds from `since` until a send answers 200 again (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = send(client, token)
        if last.status == 200:
            return time.monotonic() - since
        time.sleep(0.2)
    raise AssertionError(f"no 200 within {timeout} s of the database coming back: {last}")


def assert_prompt(answers: list[Answer]) -> None:
    """Every answer a 200 or a documented 503, and none later than the deadline allows."""
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert all(a.text == "service unavailable" for a in answers if a.status == 503)
    slow = sorted((round(a.latency, 2), a.status) for a in answers if a.latency > DEADLINE + MARGIN)
    assert slow == [], f"answers slower than {DEADLINE + MARGIN} s (latency, status): {slow}"


@pytest.mark.timeout(90)
def test_a_frozen_database_answers_503_within_the_deadline_never_a_late_200(
    api: str, pg: PostgresControl, rows: Database, client: httpx.Client, token: str
) -> None:
    # A warm pool: connections are open before the freeze, as in production.
    warm = [send(client, token) for _ in range(8)]
    assert [a.status for a in warm] == [200] * 8

    answers: list[Answer] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller() -> None:
        with httpx.Client(base_url=api, timeout=30) as http:
            for _ in range(500):  # bounded; `stop` ends it long before
                if stop.is_set():
                    return
                answer = send(http, token)
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    pg.pause()
    # From when every PostgreSQL process is stopped: listing them scans /proc, which on a busy
    # machine took longer than the margin below, and a request answered meanwhile was served.
    paused_at = time.monotonic()
    try:
        time.sleep(20)
    finally:
        pg.resume()
    resumed_at = time.monotonic()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(DEADLINE + MARGIN + 30)
    assert not any(thread.is_alive() for thread in threads)
    recovered_after = recover(client, token, resumed_at)

    during = [a for a in answers if paused_at + 0.05 <= a.started and a.finished <= resumed_at]
    failed = [a for a in answers if a.status == 503]
    print(  # the figures for the report (pytest -s)
        f"\nfreeze: {len(answers)} answers {dict(Counter(a.status for a in answers))}; "
        f"while frozen {dict(Counter(a.status for a in during))}; "
        f"503 latency max {max(a.latency for a in failed):.2f} s, "
        f"min {min(a.latency for a in failed):.2f} s; "
        f"slowest 200 {max(a.latency for a in answers if a.status == 200):.2f} s; "
        f"200 again {recovered_after:.2f} s after resume"
    )
    assert_prompt(answers)
    # The promise: never a late 200. No 200 took longer than the deadline allows (above), and
    # no request that started and ended inside the freeze was told 200: nothing could commit.
    assert during
    assert all(a.status == 503 for a in during)
    assert recovered_after < 15
    # Every 200 is a committed row (and the warm-up's too), once the database answers again.
    ledger = ledger_of(rows)
    accepted = [a.sid for a in [*warm, *answers] if a.sid]
    assert ledger.missing(accepted) == []
    assert len(set(accepted)) == len(accepted)


@pytest.mark.timeout(90)
def test_a_crashed_and_restarted_database_answers_503_then_200_without_restarting_the_api(
    api: str, pg: PostgresControl, rows: Database, client: httpx.Client, token: str
) -> None:
    assert send(client, token).status == 200  # a warm pool of connections that will break

    pg.stop("immediate")
    try:
        down = [send(client, token) for _ in range(6)]
    finally:
        pg.start()
    started_at = time.monotonic()
    recovered_after = recover(client, token, started_at)
    after = [send(client, token) for _ in range(5)]

    print(
        f"\ncrash: while down {dict(Counter(a.status for a in down))}, 503 latency max "
        f"{max(a.latency for a in down):.2f} s; 200 again {recovered_after:.2f} s after start"
    )
    assert [a.status for a in down] == [503] * 6
    assert_prompt(down)
    assert [a.status for a in after] == [200] * 5
    assert ledger_of(rows).missing([a.sid for a in after if a.sid]) == []


def _admin(pg: PostgresControl, *statements: str) -> None:
    with psycopg.connect(pg.url.replace("+psycopg", ""), autocommit=True) as connection:
        # Never wait for the (missing) synchronous standby ourselves.
        connection.execute("SET synchronous_commit = local")
        for statement in statements:
            connection.execute(statement)


@pytest.mark.timeout(90)
def test_a_retry_with_the_same_idempotency_key_after_a_503_never_makes_two_messages(
    api: str, pg: PostgresControl, rows: Database, client: httpx.Client, token: str
) -> None:
    # 1. The deadline passes while the COMMIT is in flight, and the commit lands: a COMMIT that
    #    waits for a synchronous standby that does not exist (statement_timeout ends the wait;
    #    the transaction is committed locally by then). The API's connections are cut so they
    #    reconnect with synchronous_commit on.
    committed_key = f"late-commit-{time.time_ns()}"
    _admin(
        pg,
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "ALTER DATABASE sms_dispatch_test SET synchronous_commit = on",
        "SELECT pg_reload_conf()",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    try:
        first = send(client, token, committed_key)
    finally:
        _admin(
            pg,
            "ALTER SYSTEM RESET synchronous_standby_names",
            "ALTER DATABASE sms_dispatch_test RESET synchronous_commit",
            "SELECT pg_reload_conf()",
        )
    assert first.status == 503, first
    assert first.latency <= DEADLINE + MARGIN, first
    wait_until(lambda: rows_with_key(rows, committed_key) == 1, 15, "the in-flight commit")
    retry = send(client, token, committed_key)
    assert retry.status == 200, retry
    assert retry.replayed, retry
    assert rows_with_key(rows, committed_key) == 1
    assert ledger_of(rows).missing([retry.sid or ""]) == []

    # 2. The deadline passes before anything committed (the database frozen): the abandoned
    #    work rolls back when the database answers again, and the retry is a new accept.
    lost_key = f"frozen-{time.time_ns()}"
    pg.pause()
    try:
        second = send(client, token, lost_key)
        time.sleep(1)
    finally:
        pg.resume()
    assert second.status == 503, second
    assert second.latency <= DEADLINE + MARGIN, second
    time.sleep(2)  # the abandoned thread finishes (and rolls back) meanwhile
    assert rows_with_key(rows, lost_key) == 0, "abandoned work committed after a 503"
    again = send(client, token, lost_key)
    assert again.status == 200, again
    assert not again.replayed, again
    assert send(client, token, lost_key).replayed
    assert rows_with_key(rows, lost_key) == 1
