"""Accept and enqueue: the one use case every send edge (REST v3, later SOAP and v2) calls."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from shared.accept import AcceptedMessage, SendSmsCommand, accept_send
from shared.db import Database
from shared.models import utcnow
from shared.settings import Settings
from worker.queue import PublishMarks, publish_sends


@dataclass(frozen=True, slots=True)
class Placement:
    """What a request handler needs to place messages."""

    settings: Settings
    db: Database
    celery: Celery
    marks: PublishMarks

    def place(self, command: SendSmsCommand) -> AcceptedMessage:
        """Record the message, commit, then publish: blocking, so run it off the event loop."""
        with self.db.transaction() as session:
            accepted = accept_send(session, command, self.settings, utcnow())
        # Committed: from here a crash or a broker outage delays the message, never loses it.
        if not accepted.replayed:
            publish_sends(self.celery, self.db, [accepted.sid], marks=self.marks)
        return accepted
