"""What the handlers are given, as Litestar dependencies (`Provide`, declared once in
`create_app`): the settings, the database, the transaction runner (`Transactions`: one
transaction on a worker thread, within SMSD_API_ACCEPT_DEADLINE for the request paths that
promise it), the accept use case (`GroupAccept`: send requests committed in groups on the
event loop, then published), the provider callbacks' runner (`CallbackGroups`: applied in
groups on the event loop) and the Celery app (the broker /health/ready checks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import structlog
from celery import Celery
from litestar.di import NamedDependency, Provide
from sqlalchemy.orm import Session

from shared.core.db import AcceptDeadlineExceeded, Database
from shared.core.settings import Settings
from shared.messages.callback_groups import CallbackGroups
from shared.messages.group_commit import GroupAccept
from shared.text.phone import NumberPool

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Transactions:
    """Runs a handler's database work off the event loop, one transaction per call: committed
    when the work returns, rolled back when it raises."""

    db: Database
    settings: Settings

    async def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction, answered within SMSD_API_ACCEPT_DEADLINE (see
        `within_deadline`): rolled back, never committed, once the request stopped waiting."""

        def in_transaction(abandoned: threading.Event) -> T:
            with self.db.transaction(abandoned) as session:
                return work(session)

        return await self.within_deadline(in_transaction)

    async def run_unbounded(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction, waiting as long as the database takes (its
        connect, statement and TCP timeouts bound that): short links, tracking and provider
        callbacks, which answer no caller's accept."""

        def in_transaction() -> T:
            with self.db.transaction() as session:
                return work(session)

        return await anyio.to_thread.run_sync(in_transaction)

    async def within_deadline(self, work: Callable[[threading.Event], T]) -> T:
        """Run `work(abandoned)` on a worker thread, answering within SMSD_API_ACCEPT_DEADLINE.

        Past the deadline the request stops waiting and raises AcceptDeadlineExceeded (503); the
        thread is abandoned, not killed: it may still be blocked on a frozen database, and ends
        when the server answers or the statement / TCP timeouts fire (shared/core/db.py).
        `abandoned` is set first, so work that finishes later rolls back instead of committing,
        and its result is never turned into an answer: no late 200. Only a COMMIT already in
        flight at the deadline may still land; the caller retries with the same Idempotency-Key
        and gets the original answer instead of a second message."""
        abandoned = threading.Event()
        deadline = self.settings.api_accept_deadline.total_seconds()
        with anyio.move_on_after(deadline):
            return await anyio.to_thread.run_sync(work, abandoned, abandon_on_cancel=True)
        # Only the deadline gets here (any other cancellation propagates out of the block).
        abandoned.set()
        log.warning("request.deadline_exceeded", deadline=deadline)
        raise AcceptDeadlineExceeded(f"no answer from the database within {deadline:g} s")


# A handler's parameter of one of these types is filled from `dependencies()` by its name
# (explicitly: Litestar 2.23 deprecated inferring dependencies from a bare type, 3.0 drops it).
SettingsDep = NamedDependency[Settings]
DatabaseDep = NamedDependency[Database]
TransactionsDep = NamedDependency[Transactions]
AcceptDep = NamedDependency[GroupAccept]
CallbacksDep = NamedDependency[CallbackGroups]
CeleryDep = NamedDependency[Celery]
NumbersDep = NamedDependency[NumberPool]


def _value(value: Any) -> Provide:
    # Provide takes a callable, not a value. This one only returns what the app built at
    # start, so it needs no thread (saying so also silences Litestar's sync_to_thread
    # warning), and its answer is cached for the app's life.
    return Provide(lambda: value, use_cache=True, sync_to_thread=False)


def dependencies(
    settings: Settings,
    db: Database,
    celery: Celery,
    groups: GroupAccept,
    callbacks: CallbackGroups,
    numbers: NumberPool,
) -> dict[str, Provide]:
    """The app-level dependencies: a handler names a parameter after one of these keys and
    receives it (never a query parameter, never in the OpenAPI document)."""
    transactions = Transactions(db=db, settings=settings)
    return {
        "settings": _value(settings),
        "database": _value(db),
        "transactions": _value(transactions),
        "accept": _value(groups),
        "callbacks": _value(callbacks),
        "celery": _value(celery),
        "numbers": _value(numbers),
    }
