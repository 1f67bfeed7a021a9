"""The bulk lane: bulk batches' messages reach the workers through a queue of their own, fed a
window at a time by the bulk pump, tenant by tenant in turn.

Single sends (REST v3/v2, SOAP) are published to the realtime lane's queue the moment they
commit, as before (a scheduled one by the sweeper when its sendAt comes); its workers read
nothing else, so no bulk batch, however large, stands in front of an IVR caller's text. A bulk
batch is committed whole and published by nobody: the pump keeps about SMSD_BULK_LANE_DEPTH of
its messages on the bulk queue, and when there is room it takes one task's worth
(SMSD_BULK_TASK_SIZE) from each tenant with queued bulk work in turn (the tenant served longest
ago first), each tenant's batches oldest first. A tenant's million-message campaign therefore
holds another tenant's hundred messages back by at most one window, not by the million.

The pump runs after the API commits a batch, after every bulk task a worker finishes, and on
every sweep (SMSD_SWEEP_INTERVAL); runs overlapping on PostgreSQL skip one another (an
advisory lock). It marks what it takes as published in the transaction that reads it and
publishes before that commits: a publish that fails rolls the marks back, a commit that fails
leaves tasks whose duplicates lose the claim. Bulk messages a worker hands back (a retry, a
sender at its rate limit) wait in the database and the pump publishes them when due, so the
bulk lane's share per tenant holds for retries too. A message of a cancelled batch found
queued again (it was being sent when the batch was cancelled, then handed back) is cancelled
here, unless the provider may have it (in doubt): that one is published for its lookup (and,
should the provider turn out not to have it, sent: a cancel withdraws only what it can).

SMSD_BULK_LANE_RATE caps the bulk lane as a whole (messages per second, over every process, in
Redis as the sender limits are): the pump publishes a task only when the lane's limiter has a
slot for it. PostgreSQL, the API (the bulk messages' receipts) and often the cores are shared
by both lanes, so a bulk lane running flat out slows single sends even though none waits
behind it on a queue; the cap keeps room for them (docs/operations.md, "Sizing")."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any

import structlog
from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.core.broker import BULK_SEND_TASK, bulk_queue
from shared.core.db import Database
from shared.core.models import utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.providers.rate_limits import Rate, RateLimits, rate_limits
from shared.text.quiet_hours import parse_quiet_hours, quiet_until

log = structlog.get_logger(__name__)

# pg_try_advisory_xact_lock's key for "a bulk pump is running" (any constant of our own).
_PUMP_LOCK = 0x5D15_B017
# The bulk lane's limiter key (SMSD_BULK_LANE_RATE), beside the senders' (shared/providers).
_LANE_RATE_KEY = "bulk-lane"
# The longest a pump waits for the lane's next slot when nothing else would pump (seconds).
_MAX_RATE_WAIT = 1.0
# Recipients one pump judges against quiet hours at most (~45 µs each): a batch held for the
# night is deferred over a few runs rather than in one that holds the pump's lock for seconds.
_QUIET_BUDGET = 2000
# Before any time a batch was served.
_NEVER = datetime.min.replace(tzinfo=UTC)


def publish_bulk(app: Celery, tasks: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Put bulk tasks (batch id, sids) on the bulk queue, in this order, in one flush; raises
    when the broker cannot take them (some may be on the queue then)."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(tasks) + 1):
        for batch_id, sids in tasks:
            app.send_task(BULK_SEND_TASK, args=[batch_id, list(sids)], producer=producer)


class BulkPump:
    """Feeds the bulk queue from the database, one process's view of it."""

    def __init__(
        self, app: Celery, db: Database, settings: Settings, limits: RateLimits | None = None
    ) -> None:
        self.celery = app
        self._db = db
        self._settings = settings
        self._limits = limits
        if limits is None and settings.bulk_lane_rate > 0:
            self._limits = rate_limits(settings)
        # This run's batches whose campaign has quiet hours: their windows; and how many of
        # their recipients it judged so far.
        self._quiet: dict[str, tuple[clock_time, clock_time]] = {}
        self._judged = 0

    def waiting_tasks(self) -> int | None:
        """Tasks on the bulk queue not yet taken by a worker; None when the broker cannot say."""
        try:
            with self.celery.connection_for_write() as connection:
                channel: Any = connection.default_channel  # kombu's stub lacks queue_declare
                try:
                    _, count, _ = channel.queue_declare(bulk_queue(self._settings), passive=True)
                except ChannelError:
                    return 0  # a Redis list that is empty does not exist
                return int(count)
        except Exception:
            log.warning("bulk_pump.broker_unreachable", exc_info=True)
            return None

    def pump(self, now: datetime | None = None, *, wait: bool = True) -> int:
        """Fill the bulk queue up to SMSD_BULK_LANE_DEPTH, a task per waiting tenant in turn,
        with what is due by `now`; returns how many messages it published (0 when another
        pump is running). Unless `wait` is false, a pump the lane's rate holds back while
        nothing else would pump waits for the next slot (at most a second)."""
        settings = self._settings
        size = max(1, settings.bulk_task_size)
        if settings.bulk_lane_rate > 0:
            # At most a tenth of a second of the lane's rate in one task: a task's messages go
            # to the provider together, and their receipts come back together.
            size = min(size, max(1, math.ceil(settings.bulk_lane_rate / 10)))
        waiting = self.waiting_tasks()
        if waiting is None:
            return 0
        room = math.ceil(settings.bulk_lane_depth / size) - waiting
        if room <= 0:
            return 0
        while True:
            held_back: list[float] = []
            with self._db.transaction() as session:
                if not _pump_lock(session):
                    return 0
                tasks = self._take(session, room, size, now or utcnow(), held_back)
                if tasks:
                    # Inside the transaction: a publish that fails rolls back the marks.
                    publish_bulk(self.celery, tasks)
            published = sum(len(sids) for _, sids in tasks)
            if published:
                log.info("bulk_pump.published", count=published, tasks=len(tasks))
            if not wait or tasks or not held_back or waiting > 0:
                return published
            if held_back[0] > _MAX_RATE_WAIT:
                return published
            # The lane's rate said wait, and the queue is empty: no bulk task will finish and
            # pump again. The next slot is at most a task's time away (a tenth of a second
            # at the lane's rate, unless it is below 10/s): wait for it here, not for the
            # next sweep. (Below 1/s, the sweep it is.)
            time.sleep(held_back[0])

    def _take(
        self, session: Session, room: int, size: int, now: datetime, held_back: list[float]
    ) -> list[tuple[str, list[str]]]:
        """Up to `room` tasks of up to `size` messages, one per tenant in turn (the tenant
        served longest ago first), each tenant's batches oldest first, as many as the lane's
        rate has slots for (the wait for the next slot goes into `held_back`); their messages
        marked published, their batches marked served in the order they were."""
        by_tenant: dict[int, deque[str]] = {}
        served_at: dict[int, datetime] = {}
        self._quiet = {}
        self._judged = 0
        for batch_id, account_id, cancelled, pumped_at, quiet in queries.unfinished_batches(
            session
        ):
            if quiet:
                self._quiet[batch_id] = parse_quiet_hours(quiet)
            if cancelled:
                # Handed back after the cancel took the rest (it was being sent then).
                queries.cancel_queued_in_batch(session, batch_id, now)
            by_tenant.setdefault(account_id, deque()).append(batch_id)
            if pumped_at is not None:
                served_at[account_id] = max(pumped_at, served_at.get(account_id, pumped_at))
        # Never served first, then the one served longest ago; a tie goes to the older batch.
        tenants = deque(sorted(by_tenant, key=lambda t: served_at.get(t, _NEVER)))
        tasks: list[tuple[str, list[str]]] = []
        self._fill(session, tenants, by_tenant, tasks, room, size, now, held_back)
        # A microsecond apart, in the order served: the next pump starts after the last.
        for turn, (batch_id, _) in enumerate(tasks):
            queries.mark_batch_pumped(session, batch_id, now + timedelta(microseconds=turn))
        return tasks

    def _fill(
        self,
        session: Session,
        tenants: deque[int],
        by_tenant: dict[int, deque[str]],
        tasks: list[tuple[str, list[str]]],
        room: int,
        size: int,
        now: datetime,
        held_back: list[float],
    ) -> None:
        # The first task's slot is taken before anything is read: a pump the rate holds back
        # (most of them, at a low rate) costs no query. Later ones once their size is known.
        if not tenants:
            return
        if (wait := self._slot(size)) > 0:
            held_back.append(wait)
            return
        in_hand = True
        while tenants and len(tasks) < room:
            tenant = tenants.popleft()
            batches = by_tenant[tenant]
            while batches:
                window = self._quiet.get(batches[0])
                if window is not None and self._judged >= _QUIET_BUDGET:
                    # Enough recipients judged for one run (the lock is held meanwhile): the
                    # rest of this batch waits for the next pump, the other tenants do not.
                    batches.popleft()
                    continue
                # With quiet hours, many at a time: a batch held for the night is deferred in
                # a few statements, not a task's worth at a time.
                sids = queries.bulk_due(session, batches[0], now, size if window is None else 500)
                if sids and window is not None:
                    self._judged += len(sids)
                    sids = self._outside_quiet_hours(session, sids, window, now)[:size]
                    if not sids:
                        continue  # all held for later: the batch's next due ones
                if sids and not in_hand and (wait := self._slot(len(sids))) > 0:
                    held_back.append(wait)
                    return
                if sids:
                    in_hand = False
                    queries.mark_bulk_published(session, sids, now)
                    tasks.append((batches[0], sids))
                    break
                # Nothing due in it now: the next batch of this tenant's, if any.
                done = batches.popleft()
                if not queries.batch_unsettled(session, done):
                    queries.finish_batch(session, done, now)
            if batches:
                tenants.append(tenant)  # back of the line, behind every other tenant

    def _outside_quiet_hours(
        self,
        session: Session,
        sids: list[str],
        window: tuple[clock_time, clock_time],
        now: datetime,
    ) -> list[str]:
        """Those of `sids` whose recipients are outside the campaign's quiet hours; the others
        wait for theirs to end (deferred, their validity counted from then)."""
        numbers = queries.numbers_of(session, sids)
        held: dict[datetime, list[str]] = {}
        free = []
        for sid in sids:
            until = quiet_until(numbers[sid], window, now)
            if until is None:
                free.append(sid)
            else:
                held.setdefault(until, []).append(sid)
        for until, waiting in held.items():
            queries.defer(session, waiting, until, self._settings.message_validity)
        if held:
            log.info("bulk_pump.quiet_hours", held=sum(map(len, held.values())))
        return free

    def _slot(self, count: int) -> float:
        """0 when the lane's rate lets `count` more messages go now (booked), else the wait.
        A limiter that cannot be asked (its Redis away) lets them go, as the senders' do:
        the lane slows nothing then, but it does not stop."""
        if self._limits is None:
            return 0.0
        try:
            rate = Rate(_LANE_RATE_KEY, self._settings.bulk_lane_rate)
            return self._limits.take([rate], count)
        except Exception:
            log.warning("bulk_pump.rate_unavailable", exc_info=True)
            return 0.0


def _pump_lock(session: Session) -> bool:
    """One pump at a time (PostgreSQL; SQLite's single writer serialises them anyway)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _PUMP_LOCK}))
