"""Publishing send tasks: always after the message's transaction committed, never inside it."""

from __future__ import annotations

import threading
import time
import weakref
from datetime import timedelta
from typing import ClassVar

import structlog
from celery import Celery

from shared.db import Database
from shared.models import utcnow
from shared.sending import mark_published
from worker.celery_app import SEND_TASK

log = structlog.get_logger(__name__)


def publish_sends(
    app: Celery,
    db: Database,
    sids: list[str],
    countdown: timedelta | None = None,
    *,
    mark_only_unchanged: bool = True,
) -> list[str]:
    """Publish one send task per sid, then mark the rows published; return those published.

    A failure here loses nothing: the rows are committed, and the sweeper publishes whatever
    is left unmarked. On Redis the tasks go out in one pipeline (kombu's publish batch): one
    round trip, and one Redis client instead of one per task."""
    started = utcnow()
    try:
        # Room for a task-sent event per task too (SMSD_TASK_EVENTS), so a batch is one flush.
        with app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(sids) + 1):
            for sid in sids:
                app.send_task(
                    SEND_TASK,
                    args=[sid],
                    countdown=countdown.total_seconds() if countdown else None,
                    producer=producer,
                )
    except Exception:
        # Counted as none published, though part of a batch may have reached the broker: those
        # are published again by the sweeper, and a second copy of a send task loses the claim.
        log.exception("queue.publish_failed", count=len(sids))
        return []
    try:
        with db.transaction() as session:
            mark_published(
                session, sids, utcnow(), unchanged_since=started if mark_only_unchanged else None
            )
    except Exception:
        log.exception("queue.mark_failed")  # only costs a duplicate publish later
    return sids


class Publisher:
    """The API's publishing: after the commit, on a thread of its own, in batches.

    A request answers 200 as soon as its message is committed; this thread then publishes
    every message committed meanwhile in one batch and marks them in one UPDATE. Under load
    that is one pipeline and one transaction for many messages instead of two per message.
    Whatever is still here when the process dies is committed and unmarked, so the sweeper
    publishes it after SMSD_SWEEP_UNPUBLISHED_AFTER: late, never lost."""

    # Beyond this many waiting (the broker has been down for a while), new ones are left to
    # the sweeper rather than held in memory.
    MAX_PENDING = 100_000
    _instances: ClassVar[weakref.WeakSet[Publisher]] = weakref.WeakSet()

    def __init__(self, app: Celery, db: Database, max_batch: int = 500) -> None:
        self.celery = app
        self._db = db
        self._max_batch = max_batch
        self._pending: list[str] = []
        self._busy = False
        self._closed = False
        self._deferring = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        Publisher._instances.add(self)

    def submit(self, sids: list[str]) -> None:
        """Publish these committed messages soon; returns at once."""
        with self._changed:
            if not self._closed:
                if len(self._pending) >= self.MAX_PENDING:
                    if not self._deferring:
                        log.warning("queue.publish_deferred_to_sweeper", pending=len(self._pending))
                    self._deferring = True
                    return
                self._deferring = False
                self._pending.extend(sids)
                if self._thread is None or not self._thread.is_alive():
                    # Started by the first message (not by every app), and again should it die.
                    self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
                    self._thread.start()
                self._changed.notify_all()
                return
        self._publish(sids)  # after close(): at once, on the caller's thread

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far was published (or failed to be)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._changed.wait(left)
        return True

    def close(self) -> None:
        """Publish what is waiting, then stop (at shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=15)

    @classmethod
    def flush_all(cls, timeout: float = 10.0) -> None:
        """`flush` every publisher of this process: whoever reads the broker right after a
        200 (tests, a shutdown hook) sees every task the 200s stand for."""
        for publisher in list(cls._instances):
            publisher.flush(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return  # closed, and nothing left
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._busy = True
            try:
                self._publish(batch)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _publish(self, sids: list[str]) -> None:
        # Never raises: a failure is logged and left to the sweeper. A worker may already have
        # claimed a message and handed it back, so the mark must not land on that.
        publish_sends(self.celery, self._db, sids, mark_only_unchanged=True)
