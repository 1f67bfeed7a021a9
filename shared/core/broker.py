"""The broker, as Celery sees it: the one Celery application definition, its settings, and the
task names. Tasks carry only messageSids, as JSON, so Flower can show them.

The API publishes through the app `create_celery` builds; `worker/celery_app.py` builds the
workers' from the same function and registers the tasks (`worker/tasks.py`) on it."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import uuid
from typing import Any

import redis.asyncio
from celery import Celery

from shared.core.settings import Settings, get_settings

SEND_TASK = "sms.send"
# Several messages in one task (`[sids]`): what one group commit of the API, or one chunk of
# the sweeper, publishes.
SEND_BATCH_TASK = "sms.send_batch"
SWEEP_TASK = "sms.sweep"
# The bulk lane: `[batchId, [sids]]` of one bulk batch (Flower's task search finds a batch's
# tasks by its id), on a queue of its own that the realtime lane's workers never read, fed by
# the bulk pump (shared/messages/lanes.py).
BULK_SEND_TASK = "sms.send_bulk"
# Status callbacks to callers (shared/messages/status_callbacks.py): beat puts one on its own
# queue every SMSD_STATUS_CALLBACK_INTERVAL; it POSTs what is due.
STATUS_CALLBACKS_TASK = "sms.status_callbacks"


def bulk_queue(settings: Settings) -> str:
    """The bulk lane's queue: `<send_queue>.bulk`."""
    return f"{settings.send_queue}.bulk"


def callbacks_queue(settings: Settings) -> str:
    """The status callbacks' queue: `<send_queue>.callbacks`."""
    return f"{settings.send_queue}.callbacks"


def sweep_queue(settings: Settings) -> str:
    """The sweeper's queue: `<send_queue>.sweep`."""
    return f"{settings.send_queue}.sweep"


LANES = ("all", "realtime", "bulk", "callbacks")


def lane_queues(settings: Settings, lane: str) -> list[str]:
    """The queues a worker of `lane` reads: `realtime` the single sends, `bulk` the bulk
    lane and the status callbacks to callers (background work both: a callback never takes a
    thread the realtime lane needs), `callbacks` only the callbacks (a pool of their own, for
    a deployment that wants one), `all` every one; each with the sweeper's queue, so any
    worker can sweep and pump."""
    queues = {
        "realtime": [settings.send_queue],
        "bulk": [bulk_queue(settings), callbacks_queue(settings)],
        "callbacks": [callbacks_queue(settings)],
        "all": [settings.send_queue, bulk_queue(settings), callbacks_queue(settings)],
    }[lane]
    return [*queues, sweep_queue(settings)]


def create_celery(settings: Settings | None = None) -> Celery:
    """The Celery app: the API process publishes through it, a worker process runs the tasks
    registered on it. Without `settings` (the workers' `celery -A worker.celery_app`) it is
    configured from the environment on first use, not at import, so whoever imports it first
    cannot freeze settings that are not final yet."""
    app = Celery("sms_dispatch", include=["worker.tasks"])
    if settings is None:
        app.add_defaults(lambda: celery_config(get_settings()))
    else:
        app.conf.update(celery_config(settings))
    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting we rely on, derived from ours."""
    return dict(
        broker_url=settings.broker_url,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        # Ack after the task ran, and hand a task back when its worker dies: a send is never
        # dropped with a worker. Running twice is safe because the task claims the message.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        worker_concurrency=settings.worker_concurrency,
        worker_pool="threads",
        worker_hijack_root_logger=False,
        # Task events cost four broker publishes per message (sent, received, started,
        # succeeded): off unless asked for. Flower turns the workers' events on by itself
        # (its --enable-events, on by default); they stay on until the workers restart.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_default_queue=settings.send_queue,
        # Single sends on the realtime lane's queue, bulk batches' on the bulk lane's; the
        # sweeper and the pump get their own queue so a backlog of sends never holds them up.
        task_routes={
            SEND_TASK: {"queue": settings.send_queue},
            SEND_BATCH_TASK: {"queue": settings.send_queue},
            BULK_SEND_TASK: {"queue": bulk_queue(settings)},
            SWEEP_TASK: {"queue": sweep_queue(settings)},
            STATUS_CALLBACKS_TASK: {"queue": callbacks_queue(settings)},
        },
        broker_connection_retry_on_startup=True,
        # A worker never gives up on a lost broker (Celery's default stops after 100 tries,
        # about 25 minutes into an outage, and the process exits): it keeps reconnecting.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # A send still running when the broker connection drops is left to finish: its task
        # cannot be acked any more and comes back (acks_late), but that copy loses the claim.
        # Cancelling it (Celery 6's default) would cut a provider call short and leave the
        # message in doubt instead; a thread pool cannot cancel it anyway.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A publish that cannot reach the broker gives up fast: the message is already committed
        # and the sweeper publishes it later, so the caller should not wait on the outage.
        broker_connection_timeout=2,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        **_redis_transport(settings.broker_url),
        broker_transport_options=_transport_options(settings),
        beat_schedule={
            "sweep": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval.total_seconds(),
                "options": {"expires": settings.sweep_interval.total_seconds()},
            },
            "status-callbacks": {
                "task": STATUS_CALLBACKS_TASK,
                "schedule": settings.status_callback_interval.total_seconds(),
                # One run may last longer than the interval; runs that wait are dropped, not
                # stacked (a run takes whatever is due, however much accumulated).
                "options": {"expires": settings.status_callback_interval.total_seconds()},
            },
        },
    )


# How often each worker looks for tasks whose worker vanished (kombu's defaults, 10 s x 10,
# scan every 100 s): every 5 s, so a killed worker's tasks are sent again about
# visibility_timeout + 5 s after it took them. The scan is one ZRANGEBYSCORE under a mutex.
UNACKED_RESTORE_INTERVAL = 5
UNACKED_RESTORE_THROTTLE = 1


def _redis_transport(broker_url: str) -> dict[str, Any]:
    """On Redis, our transport: kombu's, but it survives the broker going away
    (see shared/core/redis_transport.py)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return {}
    config: dict[str, Any] = {"broker_transport": "shared.core.redis_transport:Transport"}
    if broker_url.startswith("rediss://") and "ssl_cert_reqs" not in broker_url:
        # Naming the transport hides the rediss scheme from kombu, which would otherwise turn
        # TLS on by itself (unverified): turn it on here, verifying the server's certificate.
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return {
            # A task a worker took but never acked (the worker was killed with it prefetched
            # or running) goes back on the queue this long after it was taken. Short (60 s,
            # SMSD_BROKER_VISIBILITY_TIMEOUT) so a dead worker's tasks are sent within about a
            # minute. The price: a task still waiting in a live worker's prefetch buffer, or
            # running, after this long is delivered a second time (the copy loses the claim,
            # so that costs a query, never a send); and every countdown must stay well below
            # it, or the task is redelivered before it is due (retry_delay caps at half).
            "visibility_timeout": settings.broker_visibility_timeout.total_seconds(),
            "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
            "unacked_restore_throttle": UNACKED_RESTORE_THROTTLE,
            # A broker that vanishes without closing the connection (failover, a NAT or
            # firewall dropping it): a command waits at most socket_timeout (a publish never
            # hangs forever), the consumer's BRPOP connection is dropped and reconnected after
            # brpop_timeout (1 s) + 2 x health_check_interval, and TCP keepalive finds dead
            # idle connections. (broker_heartbeat is AMQP-only: the Redis transport has none.)
            "socket_timeout": 10,
            "socket_keepalive": True,
            "health_check_interval": 10,
        }
    # The embedded SQL broker hands its options to create_engine, which takes none of these.
    return {}


# Publishing without Celery's producer (the API's group publishes, on Redis)


class RedisTaskQueue:
    """Puts send tasks on a Redis broker's queue the way kombu's Redis transport does (an
    LPUSH of its JSON envelope onto the list named after the queue), several in one round
    trip, on the event loop. The messages are Celery's task protocol 2 (a JSON body
    `[args, kwargs, embed]` and the headers a worker and Flower read): the workers cannot
    tell them from `send_task`'s. Celery's producer costs ~0.5 ms of CPU per task, mostly
    building and encoding the same message through several layers, and wants a thread.

    Only for what needs nothing else of Celery: no countdown, no task-sent events
    (SMSD_TASK_EVENTS), the default priority."""

    def __init__(self, settings: Settings) -> None:
        self._queue = settings.send_queue
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        url = settings.broker_url
        options: dict[str, Any] = {}
        if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
            options["ssl_cert_reqs"] = "required"  # as the workers' transport (see above)
        # As Celery's publish: give up fast on a broker that is away (the sweeper publishes
        # what is committed later), never hang on one that stopped answering.
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=10, socket_keepalive=True, **options
        )

    @staticmethod
    def wanted(settings: Settings) -> bool:
        """Whether the broker is Redis and nothing needs Celery's own producer."""
        return settings.broker_url.startswith(("redis://", "rediss://")) and not (
            settings.task_events
        )

    async def publish(self, tasks: list[tuple[str, list[Any]]]) -> None:
        """Put these (task name, args) on the send queue, in order, in one round trip;
        raises redis.RedisError when the broker cannot be reached (nothing or part of them
        may be on the queue then)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, args in tasks:
                pipe.lpush(self._queue, self._message(name, args))
            await pipe.execute()

    def _message(self, name: str, args: list[Any]) -> bytes:
        task_id = str(uuid.uuid4())
        body = json.dumps([args, {}, _NO_WORKFLOW]).encode()
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {
                    "lang": "py",
                    "task": name,
                    "id": task_id,
                    "shadow": None,
                    "eta": None,
                    "expires": None,
                    "group": None,
                    "group_index": None,
                    "retries": 0,
                    "timelimit": [None, None],
                    "root_id": task_id,
                    "parent_id": None,
                    # What Flower shows as the task's arguments: the sids.
                    "argsrepr": repr(args),
                    "kwargsrepr": "{}",
                    "origin": self._origin,
                    "ignore_result": None,
                    "replaced_task_nesting": 0,
                    "stamped_headers": None,
                    "stamps": {},
                },
                "properties": {
                    "correlation_id": task_id,
                    "reply_to": "",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": self._queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        ).encode()

    async def close(self) -> None:
        await self._redis.aclose()


_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
