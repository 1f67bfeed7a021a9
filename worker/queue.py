"""Publishing send tasks: always after the message's transaction committed, never inside it."""

from __future__ import annotations

import threading
from datetime import timedelta

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
    marks: PublishMarks | None = None,
) -> list[str]:
    """Publish one send task per sid; return those published. A failure here loses nothing:
    the rows are committed and the sweeper publishes whatever is left unmarked.

    With `marks`, the rows are marked published in a later batch instead of a transaction of
    their own (the API's way: it halves the transactions per accepted message)."""
    published: list[str] = []
    try:
        with app.producer_or_acquire() as producer:
            for sid in sids:
                app.send_task(
                    SEND_TASK,
                    args=[sid],
                    countdown=countdown.total_seconds() if countdown else None,
                    producer=producer,
                )
                published.append(sid)
    except Exception:
        log.exception("queue.publish_failed", count=len(sids) - len(published))
    if published and marks is not None:
        marks.add(published)
    elif published:
        try:
            with db.transaction() as session:
                mark_published(session, published, utcnow())
        except Exception:
            log.exception("queue.mark_failed")  # only costs a duplicate publish later
    return published


class PublishMarks:
    """Marks published messages in batches, on a thread of its own, off the request path.

    A mark only keeps the sweeper from publishing a message again, and a second copy of a send
    task is harmless (it loses the claim), so a mark may be late or lost in a crash: that
    costs a duplicate task after SMSD_SWEEP_UNPUBLISHED_AFTER, never a message."""

    def __init__(self, db: Database, interval: timedelta = timedelta(milliseconds=50)) -> None:
        self._db = db
        self._interval = interval.total_seconds()
        self._pending: list[str] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, sids: list[str]) -> None:
        with self._wake:
            if self._closed:
                closed = True
            else:
                closed = False
                self._pending.extend(sids)
                if self._thread is None:  # started by the first publish, not by every app
                    self._thread = threading.Thread(
                        target=self._run, name="publish-marks", daemon=True
                    )
                    self._thread.start()
        if closed:
            self._write(sids)

    def close(self) -> None:
        """Write what is pending and stop (at shutdown)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closed:
                    self._wake.wait(self._interval)
                batch, self._pending = self._pending, []
                closed = self._closed
            if batch:
                self._write(batch)
            if closed:
                return

    def _write(self, sids: list[str]) -> None:
        try:
            with self._db.transaction() as session:
                # Only unmarked rows: a worker may have handed the message back and published
                # it again meanwhile, and its newer mark must stand.
                mark_published(session, sids, utcnow(), only_unmarked=True)
        except Exception:
            log.exception("queue.mark_failed", count=len(sids))  # the sweeper covers these
