"""The broker fails under load, on real processes: Redis SIGKILLed and restarted (empty, or
from its append-only file), a worker SIGKILLed holding prefetched tasks, a Celery worker
process killed under its supervisor. Each ends with the ledger: every accepted message is a
row, every row final, and the provider received each messageSid at most once (exactly once
when delivered).

The broker is a Redis of the test's own (tests/faults/redis_control.py); PostgreSQL, the
simulator and the API (which only receives the delivery callbacks here) are the suite's."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared.core.db import Database
from shared.core.models import utcnow
from shared.core.settings import Settings
from tests.faults.ledger import read_ledger, settle
from tests.faults.redis_control import RedisControl
from tests.support.data import Demo
from tests.support.messages import accept_message
from tests.support.processes import Process, wait_until


def broker_env(control: RedisControl, **extra: str) -> dict[str, str]:
    return {
        "SMSD_BROKER_URL": control.url,
        "SMSD_REDIS_URL": control.url,
        # One message per task from the sweeper: many tasks on the broker and in the workers'
        # hands when it fails (a batch task's fate under faults: test_group_commit.py).
        "SMSD_SEND_BATCH_SIZE": "1",
        # The value proposed as the default (60 s): a dead worker's tasks come back in a minute.
        "SMSD_BROKER_VISIBILITY_TIMEOUT": "60",
        **extra,
    }


@pytest.fixture
def own_redis() -> Iterator[RedisControl]:
    with RedisControl() as control:
        yield control


@pytest.fixture
def persistent_redis() -> Iterator[RedisControl]:
    with RedisControl(persistent=True) as control:
        yield control


def accept(db: Database, settings: Settings, count: int) -> list[str]:
    """`count` messages committed exactly as the API commits them, left for the sweeper."""
    return [accept_message(db, settings, utcnow(), with_token=False) for _ in range(count)]


def received(simulator: httpx.Client) -> int:
    return len(simulator.get("/messages").json())


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def celery_child(worker: Process) -> int:
    """The Celery worker process under the `sms-dispatch worker` supervisor."""
    found = [
        pid
        for pid in children(worker.popen.pid)
        if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(found) == 1, found
    return found[0]


def restarts(worker: Process) -> int:
    return worker.output().count("supervisor.restarting")


def assert_survived(*workers: Process) -> None:
    for worker in workers:
        assert worker.popen.poll() is None, worker.output()[-3000:]
        assert "Unrecoverable error" not in worker.output()


def test_redis_killed_and_restarted_empty_under_load_loses_and_duplicates_nothing(
    api_url: str,  # receives the delivery callbacks
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    own_redis: RedisControl,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"latency_ms": 50})
    env = broker_env(own_redis)
    first = start_worker(env=env, concurrency=8)
    second = start_worker(env=env, concurrency=8, beat=False)
    children_before = {celery_child(first), celery_child(second)}
    sids = accept(db, migrated, 300)
    wait_until(lambda: received(simulator) >= 60, 60, "the load to be under way")

    own_redis.kill()
    time.sleep(2)  # both workers notice and retry against a closed port
    at_kill = received(simulator)
    own_redis.restart_empty()
    restarted = time.monotonic()
    assert at_kill < len(sids), "the broker must die mid-load"

    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    recovered = time.monotonic() - restarted
    assert sum(status == "delivered" for status in ledger.statuses.values()) == len(sids)
    assert_survived(first, second)
    # Both kept their Celery process: the consumers reconnected rather than the process dying.
    assert {celery_child(first), celery_child(second)} == children_before
    assert restarts(first) == restarts(second) == 0
    print(f"empty restart: {len(sids)} messages, {at_kill} sent before the kill, "
          f"all final {recovered:.1f}s after the restart")  # fmt: skip


def test_redis_killed_and_restarted_with_its_data_loses_and_duplicates_nothing(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    persistent_redis: RedisControl,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"latency_ms": 50})
    # A task BRPOPped just before the kill, but not yet recorded as unacked, is gone even from
    # a Redis that kept its data: the sweeper finds it older than the oldest task still queued
    # and past the visibility timeout, and publishes it again.
    env = broker_env(persistent_redis)
    first = start_worker(env=env, concurrency=8)
    second = start_worker(env=env, concurrency=8, beat=False)
    children_before = {celery_child(first), celery_child(second)}
    sids = accept(db, migrated, 300)
    wait_until(lambda: received(simulator) >= 60, 60, "the load to be under way")

    persistent_redis.kill()
    time.sleep(2)
    at_kill = received(simulator)
    persistent_redis.restart_with_data()
    restarted = time.monotonic()
    client = persistent_redis.client()
    queued = (client.llen("sms.send"), client.hlen("unacked"))
    assert at_kill < len(sids), "the broker must die mid-load"

    ledger = settle(db, str(simulator.base_url), sids, timeout=180)
    recovered = time.monotonic() - restarted
    assert sum(status == "delivered" for status in ledger.statuses.values()) == len(sids)
    assert_survived(first, second)
    assert {celery_child(first), celery_child(second)} == children_before
    assert restarts(first) == restarts(second) == 0
    print(f"restart with data: {len(sids)} messages, {at_kill} sent before the kill, "
          f"(queued, unacked) after restart {queued}, "
          f"all final {recovered:.1f}s after the restart")  # fmt: skip


def test_a_worker_killed_holding_prefetched_tasks_has_them_sent_by_the_other(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    own_redis: RedisControl,
    start_worker: Callable[..., Process],
) -> None:
    # Slow sends and a deep prefetch: each worker holds many tasks it has not started.
    simulator.post("/control", json={"latency_ms": 500})
    env = broker_env(own_redis, SMSD_WORKER_PREFETCH_MULTIPLIER="8")
    keeper = start_worker(env=env, concurrency=4)
    victim = start_worker(env=env, concurrency=4, beat=False)
    sids = accept(db, migrated, 120)
    client = own_redis.client()
    wait_until(lambda: received(simulator) >= 10, 60, "the sends to be under way")
    wait_until(lambda: client.hlen("unacked") >= 40, 30, "both workers to hold prefetched tasks")
    unacked = client.hlen("unacked")
    victim.stop(signal.SIGKILL)  # supervisor and Celery process at once
    killed = time.monotonic()

    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    recovered = time.monotonic() - killed
    assert sum(status == "delivered" for status in ledger.statuses.values()) == len(sids)
    assert recovered < 90, f"the dead worker's tasks took {recovered:.0f}s to be sent"
    assert_survived(keeper)
    print(f"worker SIGKILL: {len(sids)} messages, {unacked} unacked at the kill, "
          f"all final {recovered:.1f}s after it")  # fmt: skip


def test_the_supervisor_restarts_a_killed_celery_worker_process(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    own_redis: RedisControl,
    start_worker: Callable[..., Process],
) -> None:
    simulator.post("/control", json={"latency_ms": 200})
    worker = start_worker(env=broker_env(own_redis), concurrency=4)
    before = celery_child(worker)
    sids = accept(db, migrated, 100)
    wait_until(lambda: received(simulator) >= 10, 60, "the sends to be under way")
    at_kill = received(simulator)
    os.kill(before, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: restarts(worker) == 1, 20, "the supervisor to restart the worker")
    wait_until(
        lambda: worker.output().count("ready.") >= 2,
        60,
        "the restarted worker to be ready",
    )
    back = time.monotonic() - killed
    after = celery_child(worker)
    assert after != before

    ledger = settle(db, str(simulator.base_url), sids, timeout=120)
    recovered = time.monotonic() - killed
    assert sum(status == "delivered" for status in ledger.statuses.values()) == len(sids)
    assert read_ledger(db, str(simulator.base_url)).twice() == {}
    assert_survived(worker)
    assert restarts(worker) == 1
    # The killed process's embedded beat was stopped, not left to run beside the new one.
    assert children(worker.popen.pid) == [after]
    print(f"child SIGKILL: {len(sids)} messages, {at_kill} sent before, worker back in "
          f"{back:.1f}s, all final {recovered:.1f}s after the kill")  # fmt: skip
