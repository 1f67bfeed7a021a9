"""What a bulk send promises, broken on real processes: a batch is stored whole or not at all,
its 202 comes only after the commit, a retry with its Idempotency-Key never stores it twice,
and what was committed but never published is sent by the sweeper, each message once.

- the API process is SIGKILLed while it writes a batch's rows (chunks already COPYed, no
  COMMIT yet): nothing of the batch may remain;
- the API process is SIGKILLed while the batch's COMMIT is in flight (held by PostgreSQL for a
  synchronous standby that does not exist): the batch commits, its caller never hears, and
  nothing published it.

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
from tests.faults.test_group_commit import (
    SYNC_WAITERS,
    SYNCHRONOUS_COMMIT,
    _plain_url,
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
def test_an_api_process_killed_during_a_batchs_commit_sends_it_once_through_the_sweeper(
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
    Idempotency-Key answers the committed batch (a replay, not a second batch); the sweeper
    publishes the batch's messages and each is delivered, received by the provider once."""
    port = free_port()
    joint = "&" if "?" in migrated.database_url else "?"
    env = {
        "SMSD_DATABASE_URL": f"{migrated.database_url}{joint}options={SYNCHRONOUS_COMMIT}",
        # The batch is the sweeper's at once if its API dies (by default after two minutes).
        "SMSD_BULK_PUBLISH_GRACE": "0",
    }
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

    # A worker with beat: its sweeper publishes what the dead API committed but never published.
    start_worker(concurrency=8, env={"SMSD_PUBLIC_BASE_URL": url})
    with db.transaction() as session:
        sids = list(session.scalars(select(Message.sid)))
    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)
