"""Publishing send tasks: always after the message's transaction committed, never inside it."""

from __future__ import annotations

from datetime import timedelta

import structlog
from celery import Celery

from shared.db import Database
from shared.models import utcnow
from shared.sending import mark_published
from worker.celery_app import SEND_TASK

log = structlog.get_logger(__name__)


def publish_sends(
    app: Celery, db: Database, sids: list[str], countdown: timedelta | None = None
) -> list[str]:
    """Publish one send task per sid; return those published. A failure here loses nothing:
    the rows are committed and the sweeper publishes whatever is left unmarked."""
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
    if published:
        try:
            with db.transaction() as session:
                mark_published(session, published, utcnow())
        except Exception:
            log.exception("queue.mark_failed")  # only costs a duplicate publish later
    return published
