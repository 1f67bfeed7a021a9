"""What a bulk send promises, broken on real processes: a batch is stored whole or not at all,
its 202 comes only after the commit, a retry with its Idempotency-Key never stores it twice,
and what was committed but never published is sent by the bulk pump, each message once.

- the API process is SIGKILLed while it writes a batch's rows (chunks already COPYed, no
  COMMIT yet): nothing of the batch may remain;
- the API process is SIGKILLed while the batch's COMMIT is in flight (held by PostgreSQL for a
  synchronous standby that does not exist): the batch commits, its caller never hears, and
  nothing published it;
- the bulk lane's worker is SIGKILLed mid-drain and the broker restarted empty: claims held,
  tasks unacknowledged and the pump's window on the queue all lost at once.

Each ends with the ledger (tests/faults/ledger.py)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, select

from shared.core.db import Database
from shared.core.models import BulkBatch, Message
from shared.core.settings import Settings
from tests.faults.ledger import settle
from tests.faults.redis_control import RedisControl
from tests.faults.test_group_commit import (
    SYNC_WAITERS,
    SYNCHRONOUS_COMMIT,
    _plain_url,
    log_events,
    start_api,
)
from tests.support.data import TENANT, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.services import free_port

BULK = f"/interact/version/3/account/{TENANT}/resources/campaign/sms/campaign1/bulk"
# The API backend that has written some of a batch's chunks and not committed.
COPYING = (
    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY messages%%'"
    " AND state IN ('active', 'idle in transaction')"
)


class BulkCall:
    """One bulk request on a thread of its own; `answer` is what its caller heard, if anything."""

    def __init__(self, url: str, rows: list[dict[str, Any]], key: str) -> None:
        self.answer: httpx.Response | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._post, args=(url, rows, key), daemon=True)
        self._thread.start()

    def _post(self, url: str, rows: list[dict[str, Any]], key: str) -> None:
        try:
            self.answer = httpx.post(
                url + BULK, headers=headers(**{"Idempotency-Key": key}), json=rows, timeout=60
            )
        except httpx.TransportError as exc:
            self.error = type(exc).__name__

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


def recipients(count: int) -> list[dict[str, Any]]:
    return [
        {"callerId": f"+1202{2_000_000 + i:07d}", "additionalParams": f"n={i}"}
        for i in range(count)
    ]


def stored(db: Database) -> tuple[int, int]:
    """(batches, messages) in the database."""
    with db.transaction() as session:
        batches = session.scalar(select(func.count()).select_from(BulkBatch)) or 0
        messages = session.scalar(select(func.count()).select_from(Message)) or 0
        return batches, messages


@pytest.mark.timeout(180)
def test_an_api_process_killed_while_it_writes_a_batch_leaves_nothing_of_it(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    """Breaks: SIGKILL of the API after some of the batch's chunks were COPYed, before its
    COMMIT. Must hold: no batch and no message remain; the caller, who heard nothing, retries
    with the same Idempotency-Key and the batch is stored once; every message is delivered and
    the provider received each messageSid exactly once."""
    port = free_port()
    first, url = start_api(spawn, "api-bulk-kill", port)
    rows = recipients(6000)

    with psycopg.connect(_plain_url(migrated.database_url), autocommit=True) as admin:
        call = BulkCall(url, rows, "bulk-kill")
        wait_until(lambda: bool(admin.execute(COPYING).fetchall()), 30, "a chunk written")
        first.stop(signal.SIGKILL)
        call.join()

    assert call.answer is None, "the kill must land before the 202"
    assert call.error is not None
    assert stored(db) == (0, 0), "part of a batch survived its API"

    start_api(spawn, "api-bulk-kill-again", port)
    retry = httpx.post(
        url + BULK, headers=headers(**{"Idempotency-Key": "bulk-kill"}), json=rows, timeout=60
    )
    assert retry.status_code == 202, retry.text
    assert retry.json()["accepted"] == len(rows)
    assert "idempotency-replay" not in retry.headers  # nothing of the first was left to replay
    assert stored(db) == (1, len(rows))

    start_worker(concurrency=8, env={"SMSD_PUBLIC_BASE_URL": url})
    with db.transaction() as session:
        sids = list(session.scalars(select(Message.sid)))
    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)


@pytest.mark.timeout(180)
def test_an_api_process_killed_during_a_batchs_commit_sends_it_once_through_the_bulk_pump(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    """Breaks: SIGKILL of the API while the batch's COMMIT waits (for a synchronous standby
    that does not exist), so the batch commits but its caller hears nothing and nothing
    publishes it. Must hold: the batch is stored once; the caller's retry with the same
    Idempotency-Key answers the committed batch (a replay, not a second batch); the bulk pump
    (run by the sweep) publishes the batch's messages and each is delivered, received by the
    provider once."""
    port = free_port()
    joint = "&" if "?" in migrated.database_url else "?"
    env = {"SMSD_DATABASE_URL": f"{migrated.database_url}{joint}options={SYNCHRONOUS_COMMIT}"}
    first, url = start_api(spawn, "api-bulk-commit-kill", port, **env)
    rows = recipients(300)

    with psycopg.connect(_plain_url(migrated.database_url), autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            call = BulkCall(url, rows, "bulk-commit-kill")
            wait_until(lambda: bool(admin.execute(SYNC_WAITERS).fetchall()), 30, "COMMIT held")
            first.stop(signal.SIGKILL)
        finally:
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")
        wait_until(lambda: not admin.execute(SYNC_WAITERS).fetchall(), 10, "the COMMIT to end")
        call.join()

    assert call.answer is None, "the kill must land before the 202"
    assert stored(db) == (1, len(rows)), "the held COMMIT completes: the batch, whole"
    with db.transaction() as session:
        unpublished = session.scalar(
            select(func.count()).select_from(Message).where(Message.published_at.is_(None))
        )
    assert unpublished == len(rows), "published before the 202?"

    start_api(spawn, "api-bulk-commit-kill-again", port)
    retry = httpx.post(
        url + BULK,
        headers=headers(**{"Idempotency-Key": "bulk-commit-kill"}),
        json=rows,
        timeout=60,
    )
    assert retry.status_code == 202, retry.text
    assert retry.headers["idempotency-replay"] == "true"
    assert retry.json()["accepted"] == len(rows)
    assert stored(db) == (1, len(rows)), "a retry stored the batch twice"

    # A worker with beat: its sweep pumps the batch the dead API committed but never pumped.
    start_worker(concurrency=8, env={"SMSD_PUBLIC_BASE_URL": url})
    with db.transaction() as session:
        sids = list(session.scalars(select(Message.sid)))
    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)


@pytest.mark.timeout(300)
def test_a_bulk_worker_killed_mid_drain_and_an_empty_broker_lose_and_duplicate_nothing(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    """Breaks: the bulk lane's worker SIGKILLed while it drains a batch (claims held, tasks
    unacknowledged), then the broker killed and restarted empty (the bulk queue's window and
    every unacknowledged task gone). Must hold: every message of the batch is delivered, each
    received by the provider once: the dead worker's claims come back through the sweeper onto
    the bulk lane, and what the broker lost is noticed (its epoch) and pumped again."""
    simulator.post("/control", json={"latency_ms": 20})
    with RedisControl() as broker:
        env = {"SMSD_BROKER_URL": broker.url, "SMSD_REDIS_URL": broker.url}
        _, url = start_api(spawn, "api-bulk-lane", free_port(), **env)
        rows = recipients(400)
        response = httpx.post(url + BULK, headers=headers(), json=rows, timeout=60)
        assert response.status_code == 202, response.text
        workers = {**env, "SMSD_PUBLIC_BASE_URL": url}
        sweeper = start_worker("--lane", "realtime", env=workers)  # with beat
        bulk = start_worker("--lane", "bulk", beat=False, concurrency=2, env=workers)
        wait_until(lambda: len(simulator.get("/messages").json()) >= 60, 60, "the drain under way")

        bulk.stop(signal.SIGKILL)
        broker.kill()
        at_kill = len(simulator.get("/messages").json())
        broker.restart_empty()
        assert at_kill < len(rows), "the bulk lane must die mid-batch"
        again = start_worker("--lane", "bulk", beat=False, concurrency=2, env=workers)

        with db.transaction() as session:
            sids = list(session.scalars(select(Message.sid)))
        ledger = settle(db, str(simulator.base_url), sids, timeout=180)
    assert len(sids) == len(rows)
    # The empty broker was noticed by its epoch, and what it held of the bulk lane pumped again
    # at once (not a minute later, when the lost-in-flight check would find it). Any worker
    # may have run that sweep: every lane's workers read the sweeper's queue.
    lost = [e for w in (sweeper, bulk, again) for e in log_events(w, "sweep.broker_lost")]
    assert lost, "the sweeper never noticed the empty broker"
    assert lost[0]["republish"] > 0, lost
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)
