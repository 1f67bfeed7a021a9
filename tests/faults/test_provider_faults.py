"""Providers that time out, reset, fail for longer than a few retries, or never send a receipt:
real worker processes, the real SDKs, the simulator playing the fault. Each test ends with
the ledger: every accepted message a row, every row final, none received twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message, utcnow
from shared.core.settings import Settings
from tests.faults.ledger import read_ledger, settle
from tests.support.data import Demo
from tests.support.messages import accept_message
from tests.support.processes import Process, wait_until
from tests.support.providers import use_providers

# Short clocks, so a fault and its recovery fit in seconds.
FAST = {
    "SMSD_PROVIDER_TIMEOUT": "0.5",
    "SMSD_IN_DOUBT_LOOKUP_AFTER": "1",
    "SMSD_RECONCILE_AFTER": "1",
    "SMSD_RECEIPT_WINDOW": "4",
    "SMSD_BREAKER_COOLDOWN": "1",
    "SMSD_BREAKER_WINDOW": "5",
}


@pytest.fixture
def workers(start_worker: Callable[..., Process]) -> Callable[..., Process]:
    def start(**env: str) -> Process:
        return start_worker(env={**FAST, **env})

    return start


@pytest.fixture
def faults(simulator: httpx.Client) -> Iterator[Callable[..., None]]:
    """Script the simulator (POST /control); everything is cleared afterwards."""

    def control(**script: object) -> None:
        simulator.post("/control", json=script).raise_for_status()

    yield control
    simulator.post("/control", json={"faults": {}, "outage": [], "callbacks": True})


def _accept(db: Database, settings: Settings, count: int) -> list[str]:
    # Each for a call of its own, so each text carries its own link: as real texts do, and
    # what tells a provider's records of them apart when one is looked up.
    return [accept_message(db, settings, utcnow()) for _ in range(count)]


def _rows(db: Database) -> dict[str, Message]:
    with db.transaction() as session:
        return {m.sid: m for m in session.scalars(select(Message))}


def test_an_outage_longer_than_any_retry_count_loses_nothing(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["simulator"])
    faults(outage=["simulator"])
    workers()
    sids = _accept(db, migrated, 40)
    # Far longer than the old five attempts (about five seconds of backoff here) lasted.
    time.sleep(15)
    assert simulator.get("/messages").json() == []
    faults(outage=[])
    ledger = settle(db, migrated.simulator_url, sids, timeout=90)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)
    # What the failed attempts left behind is gone from messages that made it.
    assert {m.error_code for m in _rows(db).values()} == {None}


@pytest.mark.parametrize("fault", ["slow_answer", "reset_after_accept"])
def test_a_simulator_call_in_doubt_is_sent_again_and_deduplicated(
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
    fault: str,
) -> None:
    use_providers(db, migrated, ["simulator"])
    faults(faults={"simulator": fault}, slow_answer_ms=1500)
    workers()
    sids = _accept(db, migrated, 10)
    wait_until(
        lambda: len(read_ledger(db, migrated.simulator_url).received) == len(sids),
        30,
        "the provider to have every message",
    )
    faults(faults={})
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"delivered"}


@pytest.mark.parametrize("fault", ["slow_answer", "reset_after_accept"])
def test_a_twilio_call_in_doubt_is_looked_up_not_sent_twice(
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
    fault: str,
) -> None:
    use_providers(db, migrated, ["twilio"])
    faults(faults={"twilio": fault}, slow_answer_ms=1500)
    workers()
    sids = _accept(db, migrated, 10)
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    # Twilio had each one already: found by the lookup (or its receipt), never sent again.
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)


def test_a_twilio_call_that_never_arrived_is_sent_once_the_lookup_says_so(
    demo: Demo,
    db: Database,
    migrated: Settings,
    simulator: httpx.Client,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["twilio"])
    faults(faults={"twilio": "blackhole"})
    workers()
    sids = _accept(db, migrated, 5)
    wait_until(
        lambda: {m.error_code for m in _rows(db).values()} == {"in-doubt"},
        30,
        "every send in doubt",
    )
    faults(faults={})
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)


def test_a_vonage_call_in_doubt_is_never_sent_again_and_its_receipt_settles_it(
    api_url: str,
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["vonage"])
    faults(faults={"vonage": "slow_answer"}, slow_answer_ms=1500)
    workers()
    sids = _accept(db, migrated, 5)
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"delivered"}
    assert all(ledger.received[sid] == 1 for sid in sids)


def test_a_vonage_call_in_doubt_without_a_receipt_ends_unknown_not_resent(
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["vonage"])
    faults(faults={"vonage": "slow_answer"}, slow_answer_ms=1500, callbacks=False)
    workers()
    sids = _accept(db, migrated, 5)
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"unknown"}
    assert all(ledger.received[sid] == 1 for sid in sids)
    assert {m.error_code for m in _rows(db).values()} == {"no-receipt"}


def test_receipts_that_never_come_are_reconciled_by_asking_the_provider(
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["simulator"])
    faults(callbacks=False)
    workers()
    sids = _accept(db, migrated, 10)
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"delivered"}
    with db.transaction() as session:
        reconciled = session.scalars(select(Message.reconciled_at)).all()
    assert all(when is not None for when in reconciled)


def test_a_provider_that_cannot_be_asked_ends_unknown_after_the_receipt_window(
    demo: Demo,
    db: Database,
    migrated: Settings,
    faults: Callable[..., None],
    workers: Callable[..., Process],
) -> None:
    use_providers(db, migrated, ["vonage"])
    faults(callbacks=False)
    workers()
    sids = _accept(db, migrated, 5)
    ledger = settle(db, migrated.simulator_url, sids, timeout=60)
    assert set(ledger.statuses.values()) == {"unknown"}
    assert {m.error_code for m in _rows(db).values()} == {"no-receipt"}
