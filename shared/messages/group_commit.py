"""Group commit: the send requests one API process receives at about the same time are
accepted in one transaction, on the event loop, and answered together once it committed.

A request joins the pending group and waits. A group closes on the event loop's next turn when
no group is being committed (a lone IVR send goes at once, never waiting for company; requests
that arrived together go together), or else after SMSD_ACCEPT_GROUP_WINDOW or when a group being
committed finishes, whichever is first; at most SMSD_ACCEPT_GROUPS_IN_FLIGHT groups are
committed at once. Each group is one `accept_group` (a few statements for all its messages), one
COMMIT, then one task for all its new messages; on PostgreSQL its statements go through
psycopg's own connection in two round trips (shared/messages/group_sql.py). Two
requests with one Idempotency-Key never share a group: the second waits for the next, and
finds the first one's message committed.

What a 200 means is unchanged: the request's message was committed. A group that fails (the
database unreachable) answers every request of it with that error (503) and leaves nothing.
A request that stops waiting (SMSD_API_ACCEPT_DEADLINE) before its group commits has its
message taken out of the group first: no late 200, and no message the caller was told failed;
only a COMMIT already in flight at the deadline may still land (as before: the caller retries
with its Idempotency-Key and gets the original answer)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from shared.core.config_cache import NotCached
from shared.core.db import Abandoned, AcceptDeadlineExceeded, AsyncDatabase
from shared.core.models import utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.accept import AcceptedMessage, Outcome, SendSmsCommand, accept_group
from shared.messages.group_sql import KeyRaceLost, accept_group_on_postgres

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class _Entry:
    command: SendSmsCommand
    answer: asyncio.Future[AcceptedMessage]
    # Set when the request stopped waiting: its message must not be committed any more.
    abandoned: bool = False
    # What two requests with one Idempotency-Key share before they are authenticated.
    key: tuple[str, str] | None = field(default=None)


class GroupAccept:
    """The accept use case for one API process, in groups."""

    def __init__(
        self,
        db: AsyncDatabase,
        settings: Settings,
        publish: Callable[[list[str]], None],
    ) -> None:
        self._db = db
        self.settings = settings
        self._deadline = settings.api_accept_deadline.total_seconds()
        self._publish = publish
        # PostgreSQL with the config cache on: the group's statements on psycopg's own
        # connection, two round trips (shared/messages/group_sql.py); otherwise on a session.
        self._fast = db.is_postgresql and settings.config_cache_ttl.total_seconds() > 0
        self._pending: deque[_Entry] = deque()
        self._in_flight = 0
        self._timer: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Published, not yet marked so: (sids, when publishing began). The next group's
        # transaction marks them, saving the publisher a transaction of its own; without a
        # group soon, a transaction of their own does (`_mark_alone`).
        self._marks: list[tuple[list[str], datetime]] = []
        self._mark_timer: asyncio.TimerHandle | None = None

    async def send(self, command: SendSmsCommand) -> AcceptedMessage:
        """Accept one request with whoever else is asking now; its answer once committed, or
        AcceptDeadlineExceeded (503) past SMSD_API_ACCEPT_DEADLINE."""
        loop = self._loop = asyncio.get_running_loop()
        entry = _Entry(command, loop.create_future())
        if command.idempotency_key and command.tenant_id:
            entry.key = (command.tenant_id, command.idempotency_key)
        self._pending.append(entry)
        self._schedule()
        # A timer, not a cancel scope: the answer is a future the group sets, and the deadline
        # only has to set it first (cheaper than a task or a scope per request).
        timer = loop.call_later(self._deadline, self._give_up, entry)
        try:
            return await entry.answer
        finally:
            timer.cancel()

    def _give_up(self, entry: _Entry) -> None:
        if entry.answer.done():
            return
        entry.abandoned = True
        log.warning("request.deadline_exceeded", deadline=self._deadline)
        entry.answer.set_exception(
            AcceptDeadlineExceeded(f"no answer from the database within {self._deadline:g} s")
        )

    def note_published(self, sids: list[str], started: datetime) -> None:
        """Called by the publisher's thread once these committed messages are on the broker."""
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("no event loop to mark the published messages on")
        self._loop.call_soon_threadsafe(self._add_marks, sids, started)

    def _add_marks(self, sids: list[str], started: datetime) -> None:
        self._requeue_marks([(sids, started)])

    def _requeue_marks(self, marks: list[tuple[list[str], datetime]]) -> None:
        self._marks.extend(marks)
        if self._marks and self._mark_timer is None:
            self._mark_timer = asyncio.get_running_loop().call_later(
                MARK_ALONE_AFTER, lambda: self._spawn(self._mark_alone())
            )

    def _take_marks(self) -> list[tuple[list[str], datetime]]:
        marks, self._marks = self._marks, []
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        return marks

    async def _mark_alone(self) -> None:
        marks = self._take_marks()
        if not marks:
            return
        try:
            async with self._db.transaction() as transaction:
                await transaction.run(lambda session: _mark(session, marks, durable=False))
        except Exception:
            # Only costs a duplicate publish later (the sweeper's), should the process end first.
            log.warning("queue.mark_failed", count=sum(len(sids) for sids, _ in marks))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for the groups being committed (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _schedule(self) -> None:
        if not self._pending or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        if self._in_flight == 0:
            # Nothing is being committed: close the group on the loop's next turn, so the
            # requests that arrived together (a burst, the callers of the last group coming
            # back) go together, and a lone request waits for nothing but that turn.
            self._timer = loop.call_soon(self._on_timer)
        elif self._in_flight < self.settings.accept_groups_in_flight:
            self._timer = loop.call_later(
                self.settings.accept_group_window.total_seconds(), self._on_timer
            )

    def _group_done(self) -> None:
        """A commit finished: the next group closes now (on the loop's next turn), whatever
        the window still had to run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._timer = asyncio.get_running_loop().call_soon(self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._in_flight < self.settings.accept_groups_in_flight:
            self._close_group()

    def _close_group(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group: list[_Entry] = []
        keys: set[tuple[str, str]] = set()
        later: list[_Entry] = []
        while self._pending and len(group) < self.settings.accept_group_size:
            entry = self._pending.popleft()
            if entry.abandoned or entry.answer.done():
                continue
            if entry.key is not None and entry.key in keys:
                # A second request with the same key waits for the next group, where it
                # finds the first one's message committed: the answer a sequence would get.
                later.append(entry)
                continue
            if entry.key is not None:
                keys.add(entry.key)
            group.append(entry)
        self._pending.extendleft(reversed(later))
        if not group:
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._commit(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, group: list[_Entry]) -> None:
        marks = self._take_marks()
        try:
            try:
                outcomes = await self._transaction(group, marks, fast=self._fast)
            except KeyRaceLost:
                # Another process took one of the keys meanwhile: again on the session, which
                # finds the twin's message (the marks were rolled back with the rest).
                outcomes = await self._transaction(group, marks, fast=False)
        except Exception as exc:
            log.warning("accept.group_failed", size=len(group), error=type(exc).__name__)
            self._requeue_marks(marks)  # rolled back with the group: marked by the next one
            for entry in group:
                if not entry.answer.done():
                    entry.answer.set_exception(exc)
            return
        finally:
            self._in_flight -= 1
            self._group_done()
        # (A message scheduled for later is the sweeper's to publish when its time comes.)
        new = [
            outcome.sid
            for outcome in outcomes
            if isinstance(outcome, AcceptedMessage)
            and not outcome.replayed
            and not outcome.scheduled
        ]
        if new:
            # Committed: from here a crash or a broker outage delays these, never loses them.
            self._publish(new)
        for entry, outcome in zip(group, outcomes, strict=True):
            if entry.answer.done():
                continue  # gave up at the deadline (and its message was left out)
            if isinstance(outcome, AcceptedMessage):
                entry.answer.set_result(outcome)
            else:
                entry.answer.set_exception(outcome)

    async def _transaction(
        self, group: list[_Entry], marks: list[tuple[list[str], datetime]], *, fast: bool
    ) -> list[Outcome]:
        """The group's transaction, committed: its outcomes, in order."""
        commands = [entry.command for entry in group]
        async with self._db.transaction() as transaction:
            if fast:
                try:
                    return await accept_group_on_postgres(
                        transaction,
                        self._db.config_cache,
                        commands,
                        self.settings,
                        utcnow(),
                        marks,
                        lambda: [not entry.abandoned for entry in group],
                    )
                except NotCached:
                    pass  # nothing written yet: the same on the session, which reads as it goes
            outcomes = await transaction.run(lambda session: self._accept(session, group, marks))
            # Requests that stopped waiting meanwhile: their messages are taken out before
            # COMMIT, so nobody told 503 has a message sent.
            gone = {
                outcome.sid
                for entry, outcome in zip(group, outcomes, strict=True)
                if entry.abandoned and isinstance(outcome, AcceptedMessage) and not outcome.replayed
            }
            if gone:
                await transaction.run(lambda session: queries.drop_messages(session, list(gone)))
                outcomes = [
                    Abandoned() if isinstance(o, AcceptedMessage) and o.sid in gone else o
                    for o in outcomes
                ]
            return outcomes

    def _accept(
        self, session: Session, group: list[_Entry], marks: list[tuple[list[str], datetime]]
    ) -> list[Outcome]:
        if marks:
            _mark(session, marks, durable=True)
        return accept_group(session, [entry.command for entry in group], self.settings, utcnow())


# How long published messages may wait for a group commit to mark them before a transaction of
# their own does: long enough for the next group under load, short beside the sweeper's wait.
MARK_ALONE_AFTER = 0.05


def _mark(session: Session, marks: list[tuple[list[str], datetime]], *, durable: bool) -> None:
    """Mark published messages, as `outbox.mark_published` does: only rows untouched since
    their publish began (a worker may have handed one back meanwhile)."""
    now = utcnow()
    for sids, started in marks:
        queries.mark_published(session, sids, now, unchanged_since=started, durable=durable)
