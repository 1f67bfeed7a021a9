"""What group commit and batch tasks introduce, broken on real processes.

The API accepts concurrent send requests in groups (shared/messages/group_commit.py): one
transaction and one COMMIT for all of a group's messages, then one `sms.send_batch` task with
all its sids; a worker claims and sends a batch task's messages together. So a crash or an
error now hits many requests or messages at once:

- an API process SIGKILLed while groups are being committed and answered;
- a database error in the middle of a group's transaction;
- a worker SIGKILLed while a batch task's messages are at the provider.

Each ends with the ledger (tests/faults/ledger.py): every 200 is a row, every row final, and
the provider (the simulator) received each messageSid at most once. PostgreSQL, Redis and the
simulator are the suite's; the workers, and the API processes that are killed or broken,
are started per test."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from shared.core.broker import SEND_BATCH_TASK
from shared.core.db import Database
from shared.core.models import Message
from shared.core.settings import Settings
from tests.faults.ledger import settle, sid_of
from tests.support.api import queued_sends
from tests.support.data import CALLER, TENANT, Demo, headers
from tests.support.processes import Process, answers, wait_until
from tests.support.services import free_port

SEND = f"/interact/version/3/account/{TENANT}/resources/campaign/sms/campaign1"
TOKEN = f"/interact/version/3/account/{TENANT}/resources/token"


@dataclass(frozen=True)
class Sent:
    """One send request and what its caller was told (`status` None: no answer at all)."""

    key: str
    status: int | None
    text: str
    sid: str | None
    # The transport error when there was no answer: ConnectError means the request never
    # reached a server; anything else (a reset, a closed connection) that it was in flight.
    error: str | None = None
    latency: float = 0.0

    @property
    def in_flight_when_cut(self) -> bool:
        return self.status is None and self.error != "ConnectError"


def send(http: httpx.Client, token: str, key: str) -> Sent:
    """One Send SMS v3 request with its own Idempotency-Key (how we find its row, if any)."""
    started = time.monotonic()
    try:
        response = http.post(
            SEND,
            headers=headers(Accept="application/json", **{"Idempotency-Key": key}),
            json={"callerId": CALLER, "jpToken": token},
        )
    except httpx.TransportError as exc:
        return Sent(key, None, "", None, type(exc).__name__, time.monotonic() - started)
    sid = response.json()["messageSid"] if response.status_code == 200 else None
    return Sent(key, response.status_code, response.text, sid, None, time.monotonic() - started)


def issue_token(url: str) -> str:
    response = httpx.post(f"{url}{TOKEN}", headers=headers(), json={"callerId": CALLER})
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def start_api(
    spawn: Callable[..., Process], name: str, port: int, **env: str
) -> tuple[Process, str]:
    """An API process of the test's own on `port` (the suite's settings otherwise)."""
    url = f"http://127.0.0.1:{port}"
    process = spawn(
        name,
        "api",
        env={"SMSD_API_PORT": str(port), "SMSD_PUBLIC_BASE_URL": url, **env},
    )
    wait_until(
        lambda: answers(f"{url}/health/ready") or process.popen.poll() is not None,
        30,
        f"the API {name}",
    )
    assert process.popen.poll() is None, process.output()[-3000:]
    return process, url


def log_events(process: Process, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `process` for `event` (SMSD_LOG_JSON is on in the suite)."""
    found = []
    for line in process.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


def rows_by_key(db: Database, keys: list[str]) -> dict[str, list[str]]:
    """The sids of the message rows carrying each of these Idempotency-Keys."""
    found: dict[str, list[str]] = {key: [] for key in keys}
    with db.transaction() as session:
        result = session.execute(
            select(Message.idempotency_key, Message.sid).where(Message.idempotency_key.in_(keys))
        )
        for key, sid in result:
            if key is not None:
                found[key].append(sid)
    return found


def published(db: Database, sid: str | None) -> bool:
    with db.transaction() as session:
        return session.scalar(select(Message.published_at).where(Message.sid == sid)) is not None


def sending(db: Database) -> list[str]:
    """The messages claimed by a worker and not yet recorded as sent."""
    with db.transaction() as session:
        return list(session.scalars(select(Message.sid).where(Message.status == "sending")))


def batch_tasks(redis_url: str) -> list[list[str]]:
    """The sid lists of the `sms.send_batch` tasks waiting on the broker."""
    return [args[0] for name, args in queued_sends(redis_url) if name == SEND_BATCH_TASK]


def queued_sids(redis_url: str) -> int:
    return sum(
        len(args[0]) if name == SEND_BATCH_TASK else 1 for name, args in queued_sends(redis_url)
    )


class Callers:
    """`count` threads sending one request after another, each with a fresh Idempotency-Key,
    until stopped; every request and its outcome is recorded."""

    def __init__(self, url: str, token: str, count: int, prefix: str) -> None:
        self.sent: list[Sent] = []
        self._url = url
        self._token = token
        self._prefix = prefix
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(count)
        ]

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads)

    def _call(self, n: int) -> None:
        with httpx.Client(base_url=self._url, timeout=15) as http:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                outcome = send(http, self._token, f"{self._prefix}-{n}-{i}")
                with self._lock:
                    self.sent.append(outcome)
                if outcome.status is None:
                    time.sleep(0.2)  # the API is down: do not spin on a closed port

    def count(self) -> int:
        with self._lock:
            return len(self.sent)


def _plain_url(url: str) -> str:
    # psycopg's own URL form, without SQLAlchemy's driver name.
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


SYNCHRONOUS_COMMIT = "-c%20synchronous_commit%3Don"
# Backends whose COMMIT waits for a synchronous standby: committed locally, not yet visible.
SYNC_WAITERS = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"


@pytest.mark.timeout(150)
def test_an_api_process_killed_mid_group_loses_nothing_and_sends_nothing_twice(
    demo: Demo,
    db: Database,
    migrated: Settings,
    redis_url: str,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    """Breaks: the API process dies (SIGKILL) while groups of concurrent requests are being
    committed: their COMMITs are in flight (held there by PostgreSQL waiting for a synchronous
    standby that does not exist, so the kill lands in that window every time), so those
    requests get no answer although their messages commit, and nothing published them.

    Must hold: every 200 is a row that ends delivered; a request without an answer has at
    most one row, and retrying it with its Idempotency-Key on the restarted API gives it
    exactly one (the original, when it had committed); every row is delivered, and the
    provider received each messageSid exactly once."""
    port = free_port()
    # Only this API's sessions wait for the (missing) standby: the test's, the worker's and
    # the suite's keep the suite's synchronous_commit=off. The URL's options win (db.py).
    joint = "&" if "?" in migrated.database_url else "?"
    env = {"SMSD_DATABASE_URL": f"{migrated.database_url}{joint}options={SYNCHRONOUS_COMMIT}"}
    first, url = start_api(spawn, "api-group-kill", port, **env)
    token = issue_token(url)

    with (
        psycopg.connect(_plain_url(migrated.database_url), autocommit=True) as admin,
        Callers(url, token, 8, "kill") as callers,
    ):
        wait_until(lambda: callers.count() >= 150, 30, "the callers to be under way")
        at_kill = callers.count()
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            # Groups reach COMMIT and stay there; the kill comes well within the accept
            # deadline (3 s), so their callers are not answered 503 first.
            wait_until(lambda: bool(admin.execute(SYNC_WAITERS).fetchall()), 2, "a COMMIT held")
            time.sleep(0.3)  # more groups close and reach their COMMIT meanwhile
            held = len(admin.execute(SYNC_WAITERS).fetchall())
            first.stop(signal.SIGKILL)
        finally:
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")
        killed = time.monotonic()
        # The held COMMITs complete: rows whose requests were never answered.
        wait_until(lambda: not admin.execute(SYNC_WAITERS).fetchall(), 10, "the COMMITs to end")
        second, _ = start_api(spawn, "api-group-kill-again", port, **env)
        back_after = time.monotonic() - killed
        after_restart = callers.count()
        wait_until(lambda: callers.count() >= after_restart + 100, 30, "sends after the restart")
    sent = callers.sent

    statuses = Counter(s.status for s in sent)
    assert set(statuses) <= {200, None}, f"a healthy database answers 200 or not at all: {statuses}"
    cut = [s for s in sent if s.in_flight_when_cut]
    assert cut, "the kill must catch requests in flight"
    unanswered = [s for s in sent if s.status is None]
    before_retry = rows_by_key(db, [s.key for s in unanswered])
    committed_unanswered = sum(1 for sids in before_retry.values() if sids)
    assert all(len(sids) <= 1 for sids in before_retry.values()), before_retry
    assert committed_unanswered, "the kill must catch a group whose COMMIT was in flight"
    # Their tasks were never published (the API died before): the sweeper's to do.
    orphans = [sids[0] for sids in before_retry.values() if sids]
    assert not any(published(db, sid) for sid in orphans), "published before the answer?"

    # Groups really held several requests: their messages went out as batch tasks.
    wait_until(lambda: bool(batch_tasks(redis_url)), 10, "a batch task on the broker")
    batches = batch_tasks(redis_url)

    # The callers that got no answer retry with the same key, as the API tells them to.
    with httpx.Client(base_url=url, timeout=15) as http:
        retried = [send(http, token, s.key) for s in unanswered]
    assert [r.status for r in retried] == [200] * len(retried), Counter(r.status for r in retried)
    for before, again in zip(unanswered, retried, strict=True):
        if before_retry[before.key]:
            assert [again.sid] == before_retry[before.key], "a retry made a second message"

    # A worker with beat: its sweeper publishes what the dead API committed but never published.
    start_worker(concurrency=4, env={"SMSD_PUBLIC_BASE_URL": url})
    accepted = [s.sid for s in [*sent, *retried] if s.sid]
    ledger = settle(db, str(simulator.base_url), accepted, timeout=90)

    keys = [s.key for s in sent]
    by_key = rows_by_key(db, keys)
    assert all(len(sids) == 1 for sids in by_key.values()), "a key with no row or two rows"
    assert len(ledger.statuses) == len(keys), "rows that no request asked for"
    assert set(ledger.statuses.values()) == {"delivered"}, Counter(ledger.statuses.values())
    assert all(ledger.received[sid] == 1 for sid in ledger.statuses)
    assert second.popen.poll() is None, second.output()[-3000:]
    print(
        f"\nAPI SIGKILL mid-group: {len(sent)} requests ({at_kill} before the kill), "
        f"{held} backends held in COMMIT at the kill, {len(cut)} requests cut in flight, "
        f"{len(unanswered)} unanswered of which "
        f"{committed_unanswered} were committed; API back in {back_after:.1f}s; "
        f"{len(batches)} batch tasks queued (sizes up to {max(map(len, batches))}); "
        f"{len(ledger.statuses)} rows, all delivered once"
    )


# The groups' INSERTs wait on our lock; the statement and lock timeouts must not end that wait
# before we do, nor the accept deadline answer for us: the 503s must come from the error.
GROUP_FAILURE_ENV = {
    "SMSD_DATABASE_LOCK_TIMEOUT": "30",
    "SMSD_DATABASE_STATEMENT_TIMEOUT": "30",
    "SMSD_API_ACCEPT_DEADLINE": "10",
}
CONCURRENT = 24


@pytest.fixture
def group_failure_api(demo: Demo, spawn: Callable[..., Process]) -> Iterator[tuple[Process, str]]:
    process, url = start_api(spawn, "api-group-error", free_port(), **GROUP_FAILURE_ENV)
    yield process, url
    process.stop()


@pytest.mark.timeout(90)
def test_a_database_error_during_a_group_commit_answers_every_request_of_the_group_503_and_writes_nothing(  # noqa: E501
    db: Database,
    migrated: Settings,
    group_failure_api: tuple[Process, str],
) -> None:
    """Breaks: the connection of every group being committed is terminated by the server
    (pg_terminate_backend) while its INSERT waits on a lock the test holds on `messages`,
    with many requests gathered into those groups.

    Must hold: every request of a failed group is answered 503 `service unavailable` (from
    the database error, not the accept deadline), none of them left a message row, the
    failed groups add up to exactly these requests and at least one held several, and the
    next request gets 200 from the same process."""
    process, url = group_failure_api
    token = issue_token(url)
    with httpx.Client(base_url=url, timeout=30) as http:
        warm = send(http, token, "warm-up")  # a pool of connections, as in production
    assert warm.status == 200, warm
    # Its publisher's UPDATE (published_at) must not be among the lock's waiters below.
    wait_until(lambda: published(db, warm.sid), 10, "the warm-up message published")

    keys = [f"group-error-{n}" for n in range(CONCURRENT)]
    results: dict[str, Sent] = {}
    start = threading.Barrier(CONCURRENT)

    def caller(key: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            start.wait(10)
            results[key] = send(http, token, key)

    waiting = (
        "SELECT l.pid FROM pg_locks l WHERE l.relation = 'messages'::regclass"
        " AND NOT l.granted AND l.pid <> pg_backend_pid()"
    )
    terminated = 0
    with (
        psycopg.connect(_plain_url(migrated.database_url)) as holder,
        psycopg.connect(_plain_url(migrated.database_url), autocommit=True) as admin,
    ):
        holder.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
        threads = [threading.Thread(target=caller, args=(key,), daemon=True) for key in keys]
        for thread in threads:
            thread.start()
        wait_until(lambda: bool(admin.execute(waiting).fetchall()), 10, "a group on the lock")
        # Time for every request to reach the API: those not in the first groups gather in
        # the next ones, which the loop below fails as they reach the lock in turn. The lock
        # is held until every request was answered, so none can commit.
        time.sleep(1.0)
        ends = time.monotonic() + 15
        while any(thread.is_alive() for thread in threads) and time.monotonic() < ends:
            for (pid,) in admin.execute(waiting).fetchall():
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                terminated += 1
            time.sleep(0.05)
        still_waiting = [key for key in keys if key not in results]
        holder.rollback()  # the lock goes
    for thread in threads:
        thread.join(30)
    assert still_waiting == [], f"requests not answered while the lock was held: {still_waiting}"

    answered = [results[key] for key in keys]
    assert Counter(a.status for a in answered) == {503: CONCURRENT}, [
        (a.status, a.text, a.error) for a in answered
    ]
    assert all(a.text == "service unavailable" for a in answered)
    assert rows_by_key(db, keys) == {key: [] for key in keys}, "a failed group wrote a row"
    failed = [int(event["size"]) for event in log_events(process, "accept.group_failed")]
    assert sum(failed) == CONCURRENT, failed
    assert max(failed) > 1, f"no group held several requests: {failed}"
    assert log_events(process, "request.deadline_exceeded") == []

    with httpx.Client(base_url=url, timeout=30) as http:
        after = send(http, token, "after")
    assert after.status == 200, after
    assert rows_by_key(db, ["after"]) == {"after": [after.sid]}
    assert process.popen.poll() is None
    print(
        f"\ngroup commit error: {CONCURRENT} requests in failed groups of sizes {failed}, "
        f"{terminated} backends terminated; 503 latency "
        f"{min(a.latency for a in answered):.2f}-{max(a.latency for a in answered):.2f}s"
    )


@pytest.mark.timeout(150)
def test_a_worker_killed_mid_batch_task_loses_nothing_and_sends_nothing_twice(
    api_url: str,  # accepts in groups, and receives the delivery callbacks
    demo: Demo,
    db: Database,
    redis_url: str,
    simulator: httpx.Client,
    start_worker: Callable[..., Process],
) -> None:
    """Breaks: a worker is SIGKILLed (supervisor and Celery process at once) while a batch
    task's messages are claimed and their provider calls are under way: the provider may
    have taken them, and nothing of their outcome was recorded.

    Must hold: every 200 is a row, every row ends delivered, and the provider received each
    messageSid exactly once (the next worker settles the dead one's claims, never resends
    blindly)."""
    token = issue_token(api_url)
    with Callers(api_url, token, 8, "batch") as callers:
        wait_until(lambda: callers.count() >= 120, 60, "the messages to be accepted")
    sent = callers.sent
    assert {s.status for s in sent} == {200}, Counter(s.status for s in sent)
    accepted = [s.sid for s in sent if s.sid]
    wait_until(lambda: queued_sids(redis_url) == len(accepted), 20, "every message published")
    batches = batch_tasks(redis_url)
    assert batches, "no group held several requests: nothing was published as a batch"

    # Slow provider calls, and one task at a time: the rows `sending` at any moment are the
    # claims of one task, so three of them are a batch whose calls are at the provider.
    simulator.post("/control", json={"latency_ms": 1500})
    # The dead worker's prefetched tasks come back after the broker's visibility timeout
    # (tests/faults/test_broker.py covers the 60 s default): shorter here, for a short test.
    env = {"SMSD_BROKER_VISIBILITY_TIMEOUT": "15"}
    victim = start_worker(concurrency=1, beat=False, env=env)
    wait_until(lambda: len(sending(db)) >= 3, 30, "a batch of three or more to be claimed")
    time.sleep(0.5)  # its provider calls are on their way, none answered yet
    in_flight = sending(db)
    victim.stop(signal.SIGKILL)
    killed = time.monotonic()
    assert any(set(in_flight) <= set(batch) for batch in batches), "not one batch's claims"
    simulator.post("/control", json={"latency_ms": 10})  # the rest need not be slow
    # The provider finishes what the dead worker asked for (as a real one would): those
    # messages were taken although the worker recorded nothing. Read before their claims'
    # lease (SMSD_SEND_LEASE, 3 s) runs out, so no other worker has touched them yet.
    time.sleep(2)
    taken_after_death = sum(sid_of(m) in in_flight for m in simulator.get("/messages").json())
    assert taken_after_death, "the kill must leave provider calls that the provider took"

    keeper = start_worker(concurrency=4, env=env)  # with beat: the sweeper hands the dead claims on
    ledger = settle(db, str(simulator.base_url), accepted, timeout=60)
    recovered = time.monotonic() - killed
    assert len(ledger.statuses) == len(accepted)
    assert set(ledger.statuses.values()) == {"delivered"}, Counter(ledger.statuses.values())
    assert all(ledger.received[sid] == 1 for sid in accepted)
    assert keeper.popen.poll() is None, keeper.output()[-3000:]
    print(
        f"\nworker SIGKILL mid-batch: {len(accepted)} messages in {len(batches)} batch tasks "
        f"(sizes up to {max(map(len, batches))}); {len(in_flight)} of one batch at the "
        f"provider at the kill, {taken_after_death} of them taken by it; "
        f"all delivered once {recovered:.1f}s after the kill"
    )
