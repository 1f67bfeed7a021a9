"""Group commit: the send requests one API process receives at about the same time are
accepted in one transaction, on the event loop, and answered together once it committed.

A request joins the pending group and waits. A group closes when no group is being committed
(a lone IVR send goes at once, never waiting for company), or else after SMSD_ACCEPT_GROUP_WINDOW
or when a group being committed finishes, whichever is first; at most
SMSD_ACCEPT_GROUPS_IN_FLIGHT groups are committed at once. Each group is one `accept_group`
(a few statements for all its messages), one COMMIT, then one task for all its new messages.

What a 200 means is unchanged: the request's message was committed. A group that fails (the
database unreachable) answers every request of it with that error (503) and leaves nothing.
A request that stops waiting (SMSD_API_ACCEPT_DEADLINE) before its group commits has its
message taken out of the group first: no late 200, and no message the caller was told failed;
only a COMMIT already in flight at the deadline may still land (as before: the caller retries
with its Idempotency-Key and gets the original answer)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.orm import Session

from shared.core.db import AcceptDeadlineExceeded, AsyncDatabase
from shared.core.models import utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.accept import AcceptedMessage, Outcome, SendSmsCommand, accept_group

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
        self.settings = self._settings = settings
        self._deadline = settings.api_accept_deadline.total_seconds()
        self._publish = publish
        self._pending: deque[_Entry] = deque()
        self._in_flight = 0
        self._timer: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, command: SendSmsCommand) -> AcceptedMessage:
        """Accept one request with whoever else is asking now; its answer once committed, or
        AcceptDeadlineExceeded (503) past SMSD_API_ACCEPT_DEADLINE."""
        loop = asyncio.get_running_loop()
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
        elif self._in_flight < self._settings.accept_groups_in_flight:
            self._timer = loop.call_later(
                self._settings.accept_group_window.total_seconds(), self._on_timer
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
        if self._in_flight < self._settings.accept_groups_in_flight:
            self._close_group()

    def _close_group(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group: list[_Entry] = []
        keys: set[tuple[str, str]] = set()
        later: list[_Entry] = []
        while self._pending and len(group) < self._settings.accept_group_size:
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
        try:
            async with self._db.transaction() as transaction:
                outcomes = await transaction.run(lambda session: self._accept(session, group))
                # Requests that stopped waiting meanwhile: their messages are taken out
                # before COMMIT, so nobody told 503 has a message sent.
                gone = [
                    outcome.sid
                    for entry, outcome in zip(group, outcomes, strict=True)
                    if entry.abandoned
                    and isinstance(outcome, AcceptedMessage)
                    and not outcome.replayed
                ]
                if gone:
                    await transaction.run(lambda session: queries.drop_messages(session, gone))
        except Exception as exc:
            log.warning("accept.group_failed", size=len(group), error=type(exc).__name__)
            for entry in group:
                if not entry.answer.done():
                    entry.answer.set_exception(exc)
            return
        finally:
            self._in_flight -= 1
            self._group_done()
        new = [
            outcome.sid
            for outcome in outcomes
            if isinstance(outcome, AcceptedMessage)
            and not outcome.replayed
            and outcome.sid not in gone
        ]
        if new:
            # Committed: from here a crash or a broker outage delays these, never loses them.
            self._publish(new)
        for entry, outcome in zip(group, outcomes, strict=True):
            if entry.answer.done():
                continue  # gave up at the deadline (or its message was taken out)
            if isinstance(outcome, AcceptedMessage):
                entry.answer.set_result(outcome)
            else:
                entry.answer.set_exception(outcome)

    def _accept(self, session: Session, group: list[_Entry]) -> list[Outcome]:
        return accept_group(session, [entry.command for entry in group], self._settings, utcnow())
