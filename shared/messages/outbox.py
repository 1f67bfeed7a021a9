"""The outbox: a committed message reaches the broker, once it is committed and only then,
however the process, the broker or the network fail in between.

- `publish_sends` publishes send tasks and marks the rows published;
- `Publisher` is the API's: after the commit, on a thread of its own, in batches;
- `Outbox.sweep` (the sweeper task, every SMSD_SWEEP_INTERVAL) publishes whatever is committed
  but not on the queue: the API died between commit and publish, the broker was down, a retry
  waited in the database, a worker died mid-send, or the broker lost what it held."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import redis
import structlog
from celery import Celery
from sqlalchemy.orm import Session

from shared.core.broker import (
    BULK_SEND_TASK,
    SEND_BATCH_TASK,
    SEND_TASK,
    RedisTaskQueue,
    bulk_queue,
)
from shared.core.db import Database
from shared.core.models import utcnow
from shared.core.settings import Settings
from shared.messages import queries

log = structlog.get_logger(__name__)


def publish_sends(
    app: Celery,
    db: Database,
    sids: Sequence[str],
    countdown: timedelta | None = None,
    *,
    mark_only_unchanged: bool = True,
) -> list[str]:
    """Publish one send task per sid (`publish_batches` of one each)."""
    return publish_batches(
        app, db, [[sid] for sid in sids], countdown, mark_only_unchanged=mark_only_unchanged
    )


def publish_batches(
    app: Celery,
    db: Database,
    batches: Sequence[Sequence[str]],
    countdown: timedelta | None = None,
    *,
    mark_only_unchanged: bool = True,
    mark: bool = True,
    bulk_batch: str | None = None,
) -> list[str]:
    """Publish one task per batch of sids (a lone sid as `sms.send`, several as
    `sms.send_batch`; with `bulk_batch`, messages of that bulk batch as `sms.send_bulk` on
    the bulk lane), then mark the rows published; return the sids published.

    A failure here loses nothing: the rows are committed, and the sweeper publishes whatever
    is left unmarked. On Redis the tasks go out in one pipeline (kombu's publish batch): one
    round trip, and one Redis client instead of one per task."""
    batches = [list(batch) for batch in batches if batch]
    sids = [sid for batch in batches for sid in batch]
    if not sids:
        return []
    started = utcnow()
    try:
        # Room for a task-sent event per task too (SMSD_TASK_EVENTS), so a batch is one flush.
        with app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(batches) + 1):
            for batch in batches:
                if bulk_batch is not None:
                    name, args = BULK_SEND_TASK, [bulk_batch, batch]
                elif len(batch) == 1:
                    name, args = SEND_TASK, [batch[0]]
                else:
                    name, args = SEND_BATCH_TASK, [batch]
                app.send_task(
                    name,
                    args=args,
                    countdown=countdown.total_seconds() if countdown else None,
                    producer=producer,
                )
    except Exception:
        # Counted as none published, though part of a batch may have reached the broker: those
        # are published again by the sweeper, and a second copy of a send task loses the claim.
        log.exception("queue.publish_failed", count=len(sids))
        return []
    if not mark:
        return sids  # the caller marks them
    try:
        with db.transaction() as session:
            queries.mark_published(
                session, sids, utcnow(), unchanged_since=started if mark_only_unchanged else None
            )
    except Exception:
        log.exception("queue.mark_failed")  # only costs a duplicate publish later
    return sids


def chunked(sids: Sequence[str], size: int) -> list[list[str]]:
    return [list(sids[start : start + size]) for start in range(0, len(sids), size)]


def merged(groups: Sequence[Sequence[str]], size: int) -> list[list[str]]:
    """Groups of sids as tasks of up to `size`: a group never split unless it alone is
    larger, several small ones together."""
    tasks: list[list[str]] = []
    for group in groups:
        if tasks and len(tasks[-1]) + len(group) <= size:
            tasks[-1].extend(group)
        else:
            tasks.extend(chunked(group, size))
    return tasks


class Publisher:
    """The API's publishing: after the commit, on a thread of its own, in batches.

    A request answers 200 as soon as its message is committed; this thread then publishes
    what was committed meanwhile and marks it in one UPDATE. Publishes are at least `window`
    seconds apart unless a full task's worth waits, as `QueuePublisher`'s, and what committed
    meanwhile goes as tasks of up to `batch_size` messages (a lone message after a quiet spell
    leaves at once).
    Whatever is still here when the process dies is committed and unmarked, so the sweeper
    publishes it after SMSD_SWEEP_UNPUBLISHED_AFTER: late, never lost."""

    # Beyond this many waiting (the broker has been down for a while), new ones are left to
    # the sweeper rather than held in memory.
    MAX_PENDING = 100_000

    def __init__(
        self,
        app: Celery,
        db: Database,
        max_batch: int = 500,
        *,
        mark: Callable[[list[str], datetime], None] | None = None,
        window: float = 0.0,
        batch_size: int = 100,
    ) -> None:
        self.celery = app
        self._db = db
        self._window = window
        self._batch_size = max(1, batch_size)
        self._last_publish = -math.inf
        # Who marks what was published (sids, when publishing began); by default this thread,
        # in a transaction of its own. The API hands it to its next group commit instead.
        self._mark = mark
        self._max_batch = max_batch
        self._pending: list[list[str]] = []
        self._pending_count = 0
        self._busy = False
        self._closed = False
        self._deferring = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        _PUBLISHERS.add(self)

    def submit(self, sids: list[str]) -> None:
        """Publish these committed messages soon, as one task; returns at once."""
        if not sids:
            return
        with self._changed:
            if not self._closed:
                if self._pending_count >= self.MAX_PENDING:
                    if not self._deferring:
                        log.warning(
                            "queue.publish_deferred_to_sweeper", pending=self._pending_count
                        )
                    self._deferring = True
                    return
                self._deferring = False
                self._pending.append(list(sids))
                self._pending_count += len(sids)
                if self._thread is None or not self._thread.is_alive():
                    # Started by the first message (not by every app), and again should it die.
                    self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
                    self._thread.start()
                self._changed.notify_all()
                return
        self._publish([list(sids)])  # after close(): at once, on the caller's thread

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
        for publisher in list(_PUBLISHERS):
            publisher.flush(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return  # closed, and nothing left
                while (
                    not self._closed
                    and self._pending_count < self._batch_size
                    and (wait := self._last_publish + self._window - time.monotonic()) > 0
                ):
                    self._changed.wait(wait)  # what commits meanwhile joins this task
                self._last_publish = time.monotonic()
                batch: list[list[str]] = []
                taken = 0
                while self._pending and (
                    not batch or taken + len(self._pending[0]) <= self._max_batch
                ):
                    group = self._pending.pop(0)
                    batch.append(group)
                    taken += len(group)
                self._pending_count -= taken
                self._busy = True
            try:
                self._publish(batch)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _publish(self, groups: list[list[str]]) -> None:
        # Never raises: a failure is logged and left to the sweeper. A worker may already have
        # claimed a message and handed it back, so the mark must not land on that.
        tasks = merged(groups, self._batch_size)
        if self._mark is None:
            publish_batches(self.celery, self._db, tasks, mark_only_unchanged=True)
            return
        started = utcnow()
        published = publish_batches(self.celery, self._db, tasks, mark=False)
        if published:
            try:
                self._mark(published, started)
            except Exception:
                log.exception("queue.mark_failed")  # only costs a duplicate publish later


class QueuePublisher:
    """The API's publishing on a Redis broker: `Publisher`'s job on the event loop, the tasks
    put straight onto the queue (`RedisTaskQueue`), no thread to wake.

    Publishes are at least `window` seconds apart unless a full task's worth (`batch_size`) is
    waiting: a message committed when none went out within the window leaves at once (a lone
    IVR send waits for nothing), the rest wait for the window's end or a full task, and
    whatever committed meanwhile goes as tasks of up to `batch_size` messages, in one round
    trip. Under load that makes tasks of many messages instead of one per group commit: a
    worker's cost per task (Celery's delivery and ack, a claim and a record transaction) is
    shared by more messages (docs/performance.md, fifth pass). What is published is handed to
    `mark` (the next group commit marks it); what could not be is left to the sweeper, as
    with `Publisher`."""

    MAX_PENDING = Publisher.MAX_PENDING

    def __init__(
        self,
        queue: RedisTaskQueue,
        mark: Callable[[list[str], datetime], None],
        *,
        window: float = 0.0,
        batch_size: int = 100,
    ) -> None:
        self._queue = queue
        self._mark = mark
        self._window = window
        self._batch_size = max(1, batch_size)
        self._last_publish = -math.inf
        self._pending: list[list[str]] = []
        self._pending_count = 0
        self._deferring = False
        self._draining: asyncio.Task[None] | None = None
        # Set when a full task's worth is waiting: the window's wait ends early.
        self._full = asyncio.Event()
        # Set while nothing is waiting or on the wire; read by `flush` from other threads.
        self._idle = threading.Event()
        self._idle.set()
        _PUBLISHERS.add(self)

    def submit(self, sids: list[str]) -> None:
        """Publish these committed messages soon, as one task (on the event loop)."""
        if not sids:
            return
        if self._pending_count >= self.MAX_PENDING:
            if not self._deferring:
                log.warning("queue.publish_deferred_to_sweeper", pending=self._pending_count)
            self._deferring = True
            return
        self._deferring = False
        self._pending.append(list(sids))
        self._pending_count += len(sids)
        self._idle.clear()
        if self._pending_count >= self._batch_size:
            self._full.set()
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            while self._pending:
                wait = self._last_publish + self._window - loop.time()
                if wait > 0 and self._pending_count < self._batch_size:
                    # What commits meanwhile joins this task; a full task's worth ends the wait.
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), wait)
                self._last_publish = loop.time()
                groups, self._pending, self._pending_count = self._pending, [], 0
                started = utcnow()
                tasks = [
                    (SEND_TASK, [batch[0]]) if len(batch) == 1 else (SEND_BATCH_TASK, [batch])
                    for batch in merged(groups, self._batch_size)
                ]
                try:
                    await self._queue.publish(tasks)
                except Exception:
                    # Counted as none published, though some may have reached the broker:
                    # the sweeper publishes them again, and a second copy loses the claim.
                    log.exception("queue.publish_failed", count=sum(len(group) for group in groups))
                    continue
                try:
                    self._mark([sid for group in groups for sid in group], started)
                except Exception:
                    log.exception("queue.mark_failed")  # only costs a duplicate publish later
        finally:
            self._draining = None
            self._idle.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far was published: from another thread, never
        from the event loop it publishes on (it would block that loop)."""
        return self._idle.wait(timeout)

    async def close(self) -> None:
        """Publish what is waiting, then stop (at shutdown)."""
        if self._draining is not None:
            await asyncio.wait({self._draining}, timeout=15)
        await self._queue.close()


# Every publisher of this process, for `flush_all`.
_PUBLISHERS: weakref.WeakSet[Publisher | QueuePublisher] = weakref.WeakSet()


# Countdowns the broker holds for us stay this short (well inside its visibility timeout);
# anything longer waits in the database and the sweeper publishes it when due.
MAX_COUNTDOWN = timedelta(seconds=10)


def publish_after(app: Celery, db: Database, sids: list[str], delay: timedelta | None) -> None:
    """Publish again after `delay`: at once, through a short broker countdown, or (longer
    delays) left to the sweeper, which publishes the message when `next_attempt_at` comes."""
    if delay is None or delay <= MAX_COUNTDOWN:
        publish_sends(app, db, sids, countdown=delay if delay else None)


def mark_published(
    session: Session, sids: list[str], now: datetime, *, unchanged_since: datetime | None = None
) -> None:
    """Note that the send tasks are on the queue, so the sweeper leaves them alone.

    With `unchanged_since` (when publishing began) only rows still unmarked and untouched since
    are marked: a worker may have claimed a message and handed it back meanwhile (clearing the
    mark), and a late mark must not hide that from the sweeper."""
    queries.mark_published(session, sids, now, unchanged_since=unchanged_since)


def due_for_publish(
    session: Session, settings: Settings, now: datetime
) -> list[tuple[str, str | None]]:
    """What the sweeper must (re-)publish, each with its bulk batch's id (None for a single
    send); publishing marks them, so the next sweep skips them.

    - a single send committed but not on the queue (the API died between commit and publish,
      the broker was down, a retry waiting in the database, or the broker lost it: see
      `note_broker_epoch`), once its time has come;
    - claimed by a worker whose lease ran out (the worker died mid-send), once, single send
      or bulk (a bulk batch's other queued messages are the bulk pump's: shared/messages/lanes).

    A message on the queue is never published again because it waits long: a backlog of any
    length stays as it is. Two overlapping sweeps may pick the same rows; the duplicate tasks
    lose the claim."""
    return queries.unpublished(
        session, now, now - settings.sweep_unpublished_after, settings.sweep_batch_size
    )


def note_broker_epoch(session: Session, epoch: str, born: datetime, now: datetime) -> int:
    """Compare the broker's epoch with the one last seen; returns how many messages must be
    published again because the broker lost them (0 when it is the same broker state).

    The epoch is a key the sweeper keeps in Redis: a Redis that restarted empty has lost it,
    and every task it held. Messages published before the new epoch was born and not yet
    claimed are unmarked, so the sweeper publishes each once more, in batches."""
    state = queries.outbox_state_locked(session)
    if state is None:
        # A new installation: nothing published before can have been lost to it.
        queries.add_outbox_state(session, epoch, now)
        return 0
    if state.broker_epoch == epoch:
        return 0
    count = queries.unmark_published_before(session, born)
    count += queries.unmark_published_before(session, born, bulk=True)
    state.broker_epoch = epoch
    state.updated_at = now
    log.warning("sweep.broker_lost", epoch=epoch, republish=count)
    return count


def note_lost_in_flight(session: Session, cutoff: datetime, *, bulk: bool = False) -> int:
    """Queued messages published before `cutoff` and never claimed: no broker copy of them is
    left (a worker died between taking a task and recording it unacked, a Redis that kept its
    data but not that). Unmarked, so the sweeper (or, `bulk`, the bulk pump) publishes each
    once more; returns how many.

    The caller picks `cutoff` so that it cannot touch a backlog: before the oldest task still
    on the queue (the queue is first in, first out) and older than anything a live worker may
    still hold unacknowledged."""
    count = queries.unmark_published_before(session, cutoff, bulk=bulk)
    if count:
        log.warning("sweep.lost_in_flight", republish=count, bulk=bulk)
    return count


BROKER_EPOCH_KEY = "smsd:broker-epoch"


class Outbox:
    """The sweeper's side of the outbox, for one worker process."""

    def __init__(self, app: Celery, db: Database, settings: Settings) -> None:
        self.celery = app
        self._db = db
        self._settings = settings
        self._epoch_client: redis.Redis | None = None

    def sweep(self) -> int:
        """Publish what is committed but not on the queue; returns how many it published."""
        settings = self._settings
        self._check_broker_epoch()
        total = 0
        while True:
            with self._db.transaction() as session:
                due = due_for_publish(session, settings, utcnow())
            if not due:
                break
            lanes: dict[str | None, list[str]] = {}
            for sid, batch_id in due:
                lanes.setdefault(batch_id, []).append(sid)
            sids = [sid for sid, _ in due]
            published = []
            for batch_id, lane in lanes.items():
                size = settings.send_batch_size if batch_id is None else settings.bulk_task_size
                published += publish_batches(
                    self.celery, self._db, chunked(lane, size), bulk_batch=batch_id
                )
            total += len(published)
            log.info("sweep.published", count=len(published))
            # A short batch is the last; a failed publish waits for the next sweep.
            if len(sids) < settings.sweep_batch_size or len(published) < len(sids):
                break
        return total

    def _check_broker_epoch(self) -> None:
        """Notice a Redis broker that lost what it held (a restart without persistence, a
        failover to an empty replica): its epoch key is gone, so a new one is born here."""
        settings = self._settings
        if not settings.broker_url.startswith(("redis://", "rediss://")):
            return  # the SQL broker and RabbitMQ keep their queues through restarts
        try:
            if self._epoch_client is None:
                self._epoch_client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
            client = self._epoch_client
            client.set(BROKER_EPOCH_KEY, f"{time.time():.3f}:{uuid.uuid4().hex}", nx=True)
            epoch = client.get(BROKER_EPOCH_KEY)
        except redis.RedisError:
            log.warning("sweep.broker_unreachable")
            return
        if epoch is None:
            return
        value = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        born = datetime.fromtimestamp(float(value.partition(":")[0]), UTC)
        with self._db.transaction() as session:
            note_broker_epoch(session, value, born, utcnow())
        self._check_queue_head(client)

    def _check_queue_head(self, client: redis.Redis) -> None:
        """Find messages lost in flight: published, never claimed, and older than the oldest
        task still waiting on the queue (first in, first out: whatever was published before it
        was taken) and than anything a live worker may still hold unacknowledged."""
        settings = self._settings
        grace = settings.broker_visibility_timeout + 2 * settings.sweep_interval + MAX_COUNTDOWN
        # Each lane's queue on its own: its messages against its head.
        for queue, bulk in ((settings.send_queue, False), (bulk_queue(settings), True)):
            cutoff = utcnow() - grace
            try:
                oldest = client.lindex(queue, -1)
            except redis.RedisError:
                return
            head = sid_of_task(oldest) if oldest is not None else None
            with self._db.transaction() as session:
                if head is not None:
                    head_published = queries.published_at_of(session, head)
                    if head_published is None:
                        continue  # cannot place the head in time: judge nothing this round
                    cutoff = min(cutoff, head_published)
                note_lost_in_flight(session, cutoff, bulk=bulk)


def sid_of_task(raw: bytes | str) -> str | None:
    """The (first) messageSid a Celery send task on a Redis list carries (kombu's JSON
    envelope, the body base64 JSON `[args, kwargs, embed]`)."""
    try:
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        args = body[0]
        sid = args[1] if len(args) == 2 else args[0]  # a bulk task: [batchId, sids]
        if isinstance(sid, list):  # a batch task: its sids were published together
            sid = sid[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return sid if isinstance(sid, str) else None
