"""The Celery tasks: send one message, send a batch, send a bulk batch's task (and pump the
bulk lane after it), sweep (and pump), and deliver status callbacks. Each is a few lines around a
use case in shared/messages: the task is where Celery's retry policy and the worker's metrics
live."""

from __future__ import annotations

import threading
from typing import Any

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.core.broker import (
    BULK_SEND_TASK,
    SEND_BATCH_TASK,
    SEND_TASK,
    STATUS_CALLBACKS_TASK,
    SWEEP_TASK,
)
from shared.core.db import Database
from shared.core.settings import get_settings
from shared.messages.lanes import BulkPump
from shared.messages.outbox import Outbox
from shared.messages.reconcile import reconcile
from shared.messages.send import BatchInterrupted, Sender, SendOutcome
from shared.messages.status_callbacks import StatusCallbackDeliverer
from shared.providers.circuit_breakers import circuit_breakers
from shared.providers.rate_limits import rate_limits
from shared.providers.registry import ProviderClients
from worker.celery_app import app
from worker.metrics import SEND_LATENCY, STATUS_CALLBACK_DELIVERIES, count_send

_lock = threading.Lock()
_sender: Sender | None = None
_outbox: Outbox | None = None
_pump: BulkPump | None = None
_deliverer: StatusCallbackDeliverer | None = None


def sender() -> Sender:
    """This process's send use case, built on first use from the environment's settings."""
    global _sender
    with _lock:
        if _sender is None:
            settings = get_settings()
            _sender = Sender(
                settings,
                Database(settings),
                app,
                ProviderClients(settings),
                rate_limits(settings),
                circuit_breakers(settings),
            )
        return _sender


def outbox() -> Outbox:
    global _outbox
    send = sender()
    with _lock:
        if _outbox is None:
            _outbox = Outbox(app, send.db, send.settings)
        return _outbox


# Every send task's: the database briefly unreachable, run the task again soon rather than
# wait for the sweeper. That is safe at any point: the claims decide what is left to do. (A
# bulk task's retry goes back on the bulk lane's queue, its own.)
_AGAIN_WHEN_THE_DATABASE_IS_BACK: dict[str, Any] = {
    "ignore_result": True,
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "max_retries": 30,
}


@app.task(name=SEND_TASK, **_AGAIN_WHEN_THE_DATABASE_IS_BACK)
def send_message(sid: str) -> None:
    """Send one message through its provider; safe to run any number of times for one sid."""
    structlog.contextvars.bind_contextvars(messageSid=sid)
    _count(sender().send(sid))


def pump() -> BulkPump:
    global _pump
    send = sender()
    with _lock:
        if _pump is None:
            _pump = BulkPump(app, send.db, send.settings)
        return _pump


@app.task(name=SEND_BATCH_TASK, **_AGAIN_WHEN_THE_DATABASE_IS_BACK)
def send_batch(sids: list[str]) -> None:
    """Send several messages, each as `send_message` would; safe to run any number of times."""
    structlog.contextvars.bind_contextvars(batch=len(sids))
    _send_batch(sids)


@app.task(name=BULK_SEND_TASK, **_AGAIN_WHEN_THE_DATABASE_IS_BACK)
def send_bulk(batch_id: str, sids: list[str]) -> None:
    """Send messages of one bulk batch, as `send_batch`; then top the bulk lane up, so its
    workers never wait for the next sweep to find work."""
    structlog.contextvars.bind_contextvars(batchId=batch_id, batch=len(sids))
    try:
        _send_batch(sids)
    finally:
        try:
            pump().pump()
        except Exception:
            # Only late, never lost: the next bulk task or sweep pumps again.
            structlog.get_logger(__name__).warning("bulk_pump.failed", exc_info=True)


def _send_batch(sids: list[str]) -> None:
    try:
        outcomes = sender().send_batch(sids)
    except BatchInterrupted as interrupted:
        # What was done is counted; the database error makes Celery run the task again.
        for ended in interrupted.outcomes:
            _count(ended)
        raise interrupted.error from interrupted
    for ended in outcomes:
        _count(ended)


def _count(ended: SendOutcome) -> None:
    """One message's outcome and provider call, in this process's metrics."""
    if ended.provider is not None and ended.provider_seconds is not None:
        SEND_LATENCY.labels(provider=ended.provider).observe(ended.provider_seconds)
    if ended.provider is not None and ended.outcome is not None:
        count_send(ended.provider, ended.outcome.value)


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> int:
    """Publish what is committed but not on the queue, top the bulk lane up, and settle
    messages whose provider went quiet; returns how many it published."""
    published = outbox().sweep()
    try:
        # Without waiting for the lane's rate: the sweep comes again anyway, and its worker
        # (realtime or bulk) has other work.
        published += pump().pump(wait=False)
    except Exception:
        # Late, never lost: the next bulk task or sweep pumps again; reconcile still runs.
        structlog.get_logger(__name__).warning("bulk_pump.failed", exc_info=True)
    send = sender()
    reconcile(send.db, send.providers, send.settings)
    return published


def deliverer() -> StatusCallbackDeliverer:
    global _deliverer
    send = sender()
    with _lock:
        if _deliverer is None:
            _deliverer = StatusCallbackDeliverer(send.db, send.settings)
        return _deliverer


@app.task(name=STATUS_CALLBACKS_TASK, ignore_result=True)
def deliver_status_callbacks() -> int:
    """POST the status callbacks that are due; returns how many were attempted. A failed run
    loses nothing: what it had taken is leased, and taken again when the lease ends."""
    outcomes = deliverer().run()
    for outcome, count in outcomes.items():
        STATUS_CALLBACK_DELIVERIES.labels(outcome=outcome).inc(count)
    return sum(outcomes.values())
