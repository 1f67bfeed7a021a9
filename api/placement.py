"""Accept and enqueue: the one use case every send edge (REST v3, later SOAP and v2) calls."""

from __future__ import annotations

from dataclasses import dataclass

from shared.accept import AcceptedMessage, SendSmsCommand, accept_send
from shared.db import Database
from shared.models import utcnow
from shared.settings import Settings
from worker.queue import Publisher


@dataclass(frozen=True, slots=True)
class Placement:
    """What a request handler needs to place messages."""

    settings: Settings
    db: Database
    publisher: Publisher

    def place(self, command: SendSmsCommand) -> AcceptedMessage:
        """Record the message and commit (blocking, so run it off the event loop); publishing
        follows on the publisher's thread, so the caller's 200 never waits for the broker."""
        with self.db.transaction() as session:
            accepted = accept_send(session, command, self.settings, utcnow())
        # Committed: from here a crash or a broker outage delays the message, never loses it.
        if not accepted.replayed:
            self.publisher.submit([accepted.sid])
        return accepted
