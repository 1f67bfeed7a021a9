"""Accept and enqueue: the one use case every send edge (REST v3, later SOAP and v2) calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread
import structlog
from sqlalchemy.exc import TimeoutError as PoolTimeout

from shared.accept import AcceptedMessage, SendSmsCommand, accept_send
from shared.db import Database
from shared.models import utcnow
from shared.settings import Settings
from worker.queue import Publisher

log = structlog.get_logger(__name__)

T = TypeVar("T")


class AcceptDeadlineExceeded(PoolTimeout):
    """The database did not finish an accept within SMSD_API_ACCEPT_DEADLINE: the caller is
    answered 503 like any other database outage (api/errors.py), and the work is abandoned."""


@dataclass(frozen=True, slots=True)
class Placement:
    """What a request handler needs to place messages."""

    settings: Settings
    db: Database
    publisher: Publisher

    def place(
        self, command: SendSmsCommand, abandoned: threading.Event | None = None
    ) -> AcceptedMessage:
        """Record the message and commit (blocking, so run it off the event loop); publishing
        follows on the publisher's thread, so the caller's 200 never waits for the broker.

        `abandoned` set (the request's deadline passed): roll back instead of committing."""
        with self.db.transaction(abandoned) as session:
            accepted = accept_send(session, command, self.settings, utcnow())
        # Committed: from here a crash or a broker outage delays the message, never loses it.
        # (Also when the caller gave up while the COMMIT was in flight: the row is real.)
        if not accepted.replayed:
            self.publisher.submit([accepted.sid])
        return accepted

    async def within_deadline(self, work: Callable[[threading.Event], T]) -> T:
        """Run `work(abandoned)` on a worker thread, answering within SMSD_API_ACCEPT_DEADLINE.

        Past the deadline the request stops waiting and raises AcceptDeadlineExceeded (503); the
        thread is abandoned, not killed: it may still be blocked on a frozen database, and ends
        when the server answers or the statement / TCP timeouts fire (shared/db.py). `abandoned`
        is set first, so work that finishes later rolls back instead of committing, and its
        result is never turned into an answer: no late 200. Only a COMMIT already in flight at
        the deadline may still land; the caller retries with the same Idempotency-Key and gets
        the original answer instead of a second message."""
        abandoned = threading.Event()
        deadline = self.settings.api_accept_deadline.total_seconds()
        with anyio.move_on_after(deadline):
            return await anyio.to_thread.run_sync(work, abandoned, abandon_on_cancel=True)
        # Only the deadline gets here (any other cancellation propagates out of the block).
        abandoned.set()
        log.warning("request.deadline_exceeded", deadline=deadline)
        raise AcceptDeadlineExceeded(f"no answer from the database within {deadline:g} s")
