"""Provider callbacks in groups: the callbacks one API process receives at about the same time
are applied in one transaction, on the event loop, and answered together once it committed.

A provider calls us back twice per message (`sent`, `delivered`). One transaction on a worker
thread for each cost about what a whole accept costs; in a group, the pool checkout, the
config-generation read, BEGIN and COMMIT are paid once for many, the provider accounts are read
once per group (the session's identity map), and no callback needs a thread.

Each callback's work is the same synchronous function it always was (api/webhooks.py): verify,
bind to the message's own provider account, apply through the lifecycle. What each answers is
unchanged:

- A callback whose work raises (a forged signature, data the database refuses) answers what it
  would have answered alone, and changes nothing, while the rest of its group is applied: the
  group is run again with each callback in a savepoint of its own (only when one raised; the
  common case pays no savepoints).
- A group whose transaction fails as a whole (the database unreachable, its COMMIT refused)
  answers every callback of it with that error, as one callback alone would have been answered
  (503 while the database is unreachable): the provider retries, and a repeat is stored once.
- Callbacks for one message are applied in the order they arrived, so the lifecycle sees what
  it saw before (statuses only move forwards). The group is applied in messageSid order (stable),
  the order in which the worker's batch statements lock messages too, so that two groups in two
  API processes take their row locks in one order; a deadlock PostgreSQL breaks anyway (a call's
  row shared by messages of two groups) runs the group again."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.core.db import AsyncDatabase
from shared.core.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A group is at most this many callbacks, and at most this many groups are applied at once per
# process (each holds a pooled connection while it runs): while they run, the next group
# gathers. A group's work runs on the event loop, so its size bounds how long the accepts of
# the same process wait behind it: 256 callbacks held the loop for ~100 ms (an accept p99 of
# 300 ms at 300 messages/s end to end); 32 for ~10 ms, and groups that big are still few.
GROUP_SIZE = 32
GROUPS_IN_FLIGHT = 2
# PostgreSQL broke a deadlock or a serialization conflict by failing this transaction: nothing
# of it was written, so running the group again is safe.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_ATTEMPTS = 3


# Applies many callbacks of one kind at once (PostgreSQL), in order, with the outcome each
# would have had alone: its result, or the exception it answers with, having written nothing.
Batch = Callable[[Session, list[Any]], list[Any]]


@dataclass(eq=False, slots=True)
class _Entry:
    work: Callable[[Session], Any]
    order: str
    answer: asyncio.Future[Any]
    batch: Batch | None = None
    item: Any = None


class _ItemFailed:
    """One callback's work raised in its savepoint: its answer, the rest stay applied."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class CallbackGroups:
    """Applies provider callbacks for one API process, in groups on the event loop."""

    def __init__(
        self,
        db: AsyncDatabase,
        settings: Settings,
        *,
        size: int = GROUP_SIZE,
        in_flight: int = GROUPS_IN_FLIGHT,
    ) -> None:
        # The webhooks read their settings here: a handler with a second dependency costs
        # Litestar a task group per request to resolve both.
        self.settings = settings
        self._db = db
        self._batches = db.engine.dialect.name == "postgresql"
        self._size = size
        self._max_in_flight = in_flight
        self._pending: deque[_Entry] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._window = settings.callback_group_window.total_seconds()
        self._timer: asyncio.TimerHandle | None = None

    async def apply(
        self,
        work: Callable[[Session], T],
        *,
        message_sid: str | None = None,
        batch: Batch | None = None,
        item: Any = None,
    ) -> T:
        """`work(session)` in the transaction of the group this callback joins; its result once
        that committed, or what it (or the group's transaction) raised. With `batch`, the
        callbacks of the group next to each other that share it are applied as
        `batch(session, their items)` instead, set-based (PostgreSQL; `work` remains the way
        each is applied alone, in a savepoint, should the group have to run again)."""
        loop = asyncio.get_running_loop()
        entry = _Entry(work, message_sid or "", loop.create_future(), batch, item)
        self._pending.append(entry)
        self._schedule(loop)
        return cast(T, await entry.answer)

    async def close(self) -> None:
        """Wait for the groups being applied (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # The group closes SMSD_CALLBACK_GROUP_WINDOW after its first callback, or at once when
        # full, or, with every slot busy, when a group finishes. Receipts can wait a few
        # milliseconds: a steady trickle of them (a bulk lane at its rate) then makes groups
        # instead of a transaction each, the per-transaction cost single sends would pay in
        # latency (docs/performance.md, "Issue 14: lanes").
        if self._timer is not None and len(self._pending) >= self._size:
            # Full before its window ended: it closes now.
            self._timer.cancel()
            self._timer = None
            self._scheduled = False
        if self._scheduled or not self._pending or self._in_flight >= self._max_in_flight:
            return
        self._scheduled = True
        if self._window and len(self._pending) < self._size:
            self._timer = loop.call_later(self._window, self._close_group, loop)
        else:
            loop.call_soon(self._close_group, loop)

    def _close_group(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._timer = None
        group: list[_Entry] = []
        while self._pending and len(group) < self._size:
            entry = self._pending.popleft()
            if not entry.answer.done():  # its request went away (the client disconnected)
                group.append(entry)
        if not group:
            return
        self._in_flight += 1
        task = loop.create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[_Entry]) -> None:
        # Stable: one message's callbacks keep their order of arrival.
        group.sort(key=lambda entry: entry.order)
        try:
            outcomes = await self._apply_group(group)
        except Exception as exc:
            log.warning("callbacks.group_failed", size=len(group), error=type(exc).__name__)
            for entry in group:
                if not entry.answer.done():
                    entry.answer.set_exception(exc)
            return
        finally:
            self._in_flight -= 1
            self._schedule(asyncio.get_running_loop())
        for entry, outcome in zip(group, outcomes, strict=True):
            if entry.answer.done():
                continue
            if isinstance(outcome, _ItemFailed):
                entry.answer.set_exception(outcome.error)
            else:
                entry.answer.set_result(outcome)

    async def _apply_group(self, group: list[_Entry]) -> list[Any]:
        careful = False
        retries = 0
        while True:
            try:
                async with self._db.transaction() as transaction:
                    return await transaction.run(
                        partial(
                            _apply_each,
                            group=group,
                            careful=careful,
                            batches=self._batches and not careful,
                        )
                    )
            except _OneRaised:
                # Rolled back whole; again, each callback alone in a savepoint.
                careful = True
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRY_SQLSTATES:
                    raise
                retries += 1
                if retries >= _ATTEMPTS:
                    raise
                log.info("callbacks.group_retried", size=len(group), attempt=retries)


class _OneRaised(Exception):
    """A callback's work raised in a group run without savepoints: run the group again."""


def _apply_each(
    session: Session, *, group: list[_Entry], careful: bool, batches: bool
) -> list[Any]:
    outcomes: list[Any] = []
    index = 0
    while index < len(group):
        entry = group[index]
        # Each callback logs with its own context only (the lifecycle binds the message).
        structlog.contextvars.clear_contextvars()
        if batches and entry.batch is not None:
            end = index + 1
            while end < len(group) and group[end].batch is entry.batch:
                end += 1
            try:
                done = entry.batch(session, [each.item for each in group[index:end]])
            except Exception as exc:
                if _connection_lost(exc):
                    raise
                raise _OneRaised() from exc
            outcomes += [
                _ItemFailed(outcome) if isinstance(outcome, BaseException) else outcome
                for outcome in done
            ]
            index = end
            continue
        index += 1
        if not careful:
            try:
                outcomes.append(entry.work(session))
            except Exception as exc:
                if _connection_lost(exc):
                    raise
                raise _OneRaised() from exc
            continue
        try:
            with session.begin_nested():
                outcomes.append(entry.work(session))
        except Exception as exc:
            if _connection_lost(exc):
                raise  # the whole group's transaction went with it
            # Taken back to its savepoint; the others are applied.
            outcomes.append(_ItemFailed(exc))
    structlog.contextvars.clear_contextvars()
    return outcomes


def _connection_lost(exc: BaseException) -> bool:
    # The server ended the session or the network went: no callback of the group can commit.
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
