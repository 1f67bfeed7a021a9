"""Prometheus metrics of a worker process, served on SMSD_WORKER_METRICS_PORT (0 = off).

Counted as sends happen: outcomes by provider, provider call latency, retries. Read when
scraped: the send queue's depth in the broker and the age of the oldest message still
`queued`. Those two describe the deployment, not the process, so every worker reports the
same values: aggregate them with max(), not sum()."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import structlog
from celery.signals import task_retry
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.core.broker import (
    BULK_SEND_TASK,
    SEND_BATCH_TASK,
    SEND_TASK,
    bulk_queue,
    callbacks_queue,
    sweep_queue,
)
from shared.core.db import Database
from shared.core.models import utcnow
from shared.core.settings import Settings
from shared.messages import queries
from shared.messages.status_callbacks import pending_callbacks

log = structlog.get_logger(__name__)

# How each claimed send ended for this worker; `throttled` went back on the queue for its
# rate-limit slot, `retry` failed transiently and was scheduled again.
OUTCOMES = (
    "sent",
    "retry",
    "failed",
    "opted_out",
    "expired",
    "throttled",
    # A call that may have reached the provider; its breaker open, so the message waits.
    "in_doubt",
    "paused",
)
# kombu's Redis transport keeps one list per priority step: `queue`, `queue\x06\x163`, ...
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
SCRAPE_TIMEOUT = 1.0

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

SENDS = Counter(
    "smsd_sends",
    "Send tasks this worker finished, by provider and outcome "
    "(sent, retry, failed, opted_out, expired, throttled).",
    ["provider", "outcome"],
    registry=REGISTRY,
)
SEND_LATENCY = Histogram(
    "smsd_send_duration_seconds",
    "Duration of provider send calls (successful or not), by provider.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
    registry=REGISTRY,
)
RETRIES = Counter(
    "smsd_send_retries",
    "Send retries scheduled: `provider` after a transient provider error, `database` when the "
    "task itself is retried because the database did not answer.",
    ["reason"],
    registry=REGISTRY,
)


STATUS_CALLBACK_DELIVERIES = Counter(
    "smsd_status_callback_deliveries",
    "Status callback POSTs this worker made, by outcome: delivered (a 2xx), retrying (to be "
    "tried again), given_up (still failing SMSD_STATUS_CALLBACK_RETRY_FOR after the change), "
    "refused (an address the operator does not allow).",
    ["outcome"],
    registry=REGISTRY,
)


def count_send(provider: str, outcome: str) -> None:
    SENDS.labels(provider=provider, outcome=outcome).inc()
    if outcome == "retry":
        RETRIES.labels(reason="provider").inc()


@task_retry.connect
def _count_task_retry(sender: Any = None, **_kwargs: Any) -> None:
    # Only the send tasks autoretry, and only when the database failed them.
    if getattr(sender, "name", None) in (SEND_TASK, SEND_BATCH_TASK, BULK_SEND_TASK):
        RETRIES.labels(reason="database").inc()


class BacklogCollector(Collector):
    """The queue's depth and the oldest queued message's age, read at every scrape.

    Either is left out of a scrape when its source does not answer (logged), so a broker or
    database outage shows as missing series rather than as a failed scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Each lane's queue (realtime, bulk, callbacks) and the sweeper's.
        self.queues = (
            settings.send_queue,
            bulk_queue(settings),
            callbacks_queue(settings),
            sweep_queue(settings),
        )
        self._db: Database | None = None
        self.redis: Redis | None = None
        if settings.broker_url.startswith(("redis://", "rediss://")):
            self.redis = Redis.from_url(
                settings.broker_url,
                socket_connect_timeout=SCRAPE_TIMEOUT,
                socket_timeout=SCRAPE_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )

    def describe(self) -> list[Metric]:
        return []  # the samples need the broker and the database: nothing to read at register

    def collect(self) -> Iterator[Metric]:
        depth = self.queue_depth()
        if depth is not None:
            yield depth
        ages = self.oldest_queued_age()
        if ages is not None:
            yield from ages
        yield from self.status_callbacks()

    def status_callbacks(self) -> list[GaugeMetricFamily]:
        """Status callbacks not delivered yet (nor given up), and the oldest one's age."""
        now = utcnow()
        try:
            with self.database().transaction() as session:
                queries.statement_timeout(session, timedelta(seconds=SCRAPE_TIMEOUT))
                count, age = pending_callbacks(session, now)
        except Exception as exc:
            log.warning("metrics.status_callbacks_failed", error=f"{type(exc).__name__}: {exc}")
            return []
        pending = GaugeMetricFamily(
            "smsd_status_callbacks_pending",
            "Status changes not yet delivered to their statusCallback URL nor given up.",
            value=count,
        )
        oldest = GaugeMetricFamily(
            "smsd_oldest_status_callback_age_seconds",
            "Age of the oldest status change not yet delivered nor given up (0 when none is).",
            value=age,
        )
        return [pending, oldest]

    def queue_depth(self) -> GaugeMetricFamily | None:
        if self.redis is None:
            return None  # only the Redis broker can be measured this cheaply
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    for step in REDIS_PRIORITY_STEPS:
                        pipe.llen(f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" if step else queue)
                lengths: list[int] = pipe.execute()
        except Exception as exc:
            log.warning("metrics.queue_depth_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        gauge = GaugeMetricFamily(
            "smsd_queue_depth",
            "Tasks waiting in the broker queue (Redis LLEN over kombu's priority lists), "
            "countdown retries no worker fetched yet included; tasks a worker holds are not.",
            labels=["queue"],
        )
        steps = len(REDIS_PRIORITY_STEPS)
        for index, queue in enumerate(self.queues):
            gauge.add_metric([queue], sum(lengths[index * steps : (index + 1) * steps]))
        return gauge

    def oldest_queued_age(self) -> list[GaugeMetricFamily] | None:
        """Each lane's oldest queued message's age, and each tenant's bulk backlog; each read
        on its own, so a bulk backlog too large to count in time never hides the realtime
        lane's age (the one to alert on)."""
        timeout = timedelta(seconds=SCRAPE_TIMEOUT)
        now = utcnow()
        age = GaugeMetricFamily(
            "smsd_oldest_queued_message_age_seconds",
            "Age of the oldest message still `queued` in the database, per lane (0 when none is).",
            labels=["lane"],
        )
        gauges = [age]
        try:
            with self.database().transaction() as session:
                oldest = queries.oldest_queued_created_at(session, timeout)
            age.add_metric(["realtime"], _age(oldest, now))
        except Exception as exc:
            log.warning("metrics.oldest_queued_failed", error=f"{type(exc).__name__}: {exc}")
        try:
            with self.database().transaction() as session:
                queries.statement_timeout(session, timeout)
                backlog = queries.bulk_backlog(session)
        except Exception as exc:
            log.warning("metrics.bulk_backlog_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            age.add_metric(["bulk"], _age(min((at for _, at, _ in backlog), default=None), now))
            waiting = GaugeMetricFamily(
                "smsd_bulk_backlog_messages",
                "Bulk messages still `queued` in the database, per tenant (none listed: none).",
                labels=["tenant"],
            )
            for tenant, _, count in backlog:
                waiting.add_metric([tenant], count)
            gauges.append(waiting)
        return gauges if age.samples else None

    def database(self) -> Database:
        # Its own pool, not the tasks': a scrape never waits behind sends, and vice versa.
        if self._db is None:
            self._db = Database(self.settings, pool_timeout=timedelta(seconds=SCRAPE_TIMEOUT))
        return self._db


def _age(oldest: datetime | None, now: datetime) -> float:
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


_serving = False


def serve_metrics(settings: Settings) -> None:
    """Serve this process's metrics at http://{host}:{port}/metrics from a daemon thread."""
    global _serving
    if _serving:
        return
    url = f"http://{settings.worker_metrics_host}:{settings.worker_metrics_port}/metrics"
    backlog = BacklogCollector(settings)
    REGISTRY.register(backlog)
    try:
        start_http_server(
            settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=REGISTRY
        )
    except OSError as exc:
        # `sms-dispatch worker` checked the port; another process took it since.
        REGISTRY.unregister(backlog)
        log.error("metrics.unavailable", url=url, error=str(exc))
        return
    _serving = True
    log.info("metrics.serving", url=url)
