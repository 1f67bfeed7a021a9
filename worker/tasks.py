"""The Celery tasks: send one message, and sweep for messages the queue does not hold."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.accounts import CALLBACK_TOKEN
from shared.db import Database
from shared.models import Message, MessageStatus, utcnow
from shared.optout import add_opt_out
from shared.providers import (
    PermanentProviderError,
    Provider,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    TransientProviderError,
    provider_factory,
)
from shared.sending import (
    Claim,
    claim,
    due_for_publish,
    fail_over,
    record_accepted,
    record_failed,
    release,
    schedule_retry,
)
from shared.settings import get_settings
from shared.throttle import Coordination, coordination
from worker.celery_app import SEND_TASK, SWEEP_TASK, app
from worker.metrics import SEND_LATENCY, count_send
from worker.queue import publish_sends

log = structlog.get_logger(__name__)

_lock = threading.Lock()
_db: Database | None = None
# One client per provider account, shared by the pool's threads, so connections are reused.
_providers: dict[tuple[int, str], Provider] = {}


_coordination: Coordination | None = None


def database() -> Database:
    global _db
    with _lock:
        if _db is None:
            _db = Database(get_settings())
        return _db


def shared_state() -> Coordination:
    """Rate limits and circuit breakers, shared with every other worker through Redis."""
    global _coordination
    with _lock:
        if _coordination is None:
            _coordination = coordination(get_settings())
        return _coordination


def provider_for(claim_: Claim) -> Provider:
    key = (claim_.provider_account_id, repr(sorted(claim_.credentials.items())))
    with _lock:
        provider = _providers.get(key)
        if provider is None:
            provider = provider_factory(claim_.provider)(claim_.credentials, get_settings())
            _providers[key] = provider
        return provider


@app.task(
    name=SEND_TASK,
    ignore_result=True,
    # The database briefly unreachable: run the task again soon rather than wait for the
    # sweeper. That is safe at any point: the claim decides whether anything is left to do.
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=60,
    max_retries=30,
)
def send_message(sid: str) -> None:
    """Send one message through its provider; safe to run any number of times for one sid."""
    structlog.contextvars.bind_contextvars(messageSid=sid)
    settings = get_settings()
    db = database()
    state = shared_state()
    ended: tuple[str, str] | None = None
    with db.transaction() as session:
        now = utcnow()
        owned = claim(session, sid, settings, now)
        if owned is None:
            ended = _ended_by_claim(session, sid, now)
        elif state.is_open(_breaker_key(owned.provider_account_id)):
            # Its provider keeps failing: go straight to a healthy one, if the owner has one.
            owned = fail_over(session, owned, settings, utcnow(), _healthy(state)) or owned
    if owned is None:
        if ended is not None:
            count_send(*ended)
        return
    try:
        # Built (and warmed) before the rate-limit slot is taken, so the send leaves on time.
        provider = provider_for(owned)
    except Exception as exc:
        _record_failure(db, owned, exc if isinstance(exc, ProviderError) else _unexpected(exc))
        return
    wait = state.take(owned.rates(), owned.segments)
    if wait > 0:
        # The sender is at its carrier throughput: come back when a slot is free, and let
        # this thread send other messages meanwhile.
        with db.transaction() as session:
            release(session, owned, timedelta(seconds=wait), utcnow())
        count_send(owned.provider, "throttled")
        publish_sends(app, db, [sid], countdown=timedelta(seconds=wait))
        return
    try:
        if owned.in_doubt and not provider.idempotent:
            # The last worker died mid-call: the provider may have it, and it cannot dedupe.
            # Never-twice wins over never-lost here; the event says why for the operator.
            raise PermanentProviderError(
                "in-doubt", "worker lost during the provider call; not resent to avoid a duplicate"
            )
        started = time.perf_counter()
        try:
            result = provider.send(_request(owned, settings.public_base_url))
        finally:
            SEND_LATENCY.labels(provider=owned.provider).observe(time.perf_counter() - started)
    except Exception as exc:
        error = exc if isinstance(exc, ProviderError) else _unexpected(exc)
        _record_failure(db, owned, error)
        return
    state.succeeded(_breaker_key(owned.provider_account_id))
    with db.transaction() as session:
        record_accepted(
            session,
            owned,
            result.provider_message_id,
            result.provider_status,
            utcnow(),
            parts=result.parts,
            unsent_parts=result.unsent_parts,
        )
    count_send(owned.provider, "sent")


# What a claim that sends nothing did to the message, as a metrics outcome.
_CLAIM_ENDINGS = {
    MessageStatus.EXPIRED.value: "expired",
    MessageStatus.OPTED_OUT.value: "opted_out",
    MessageStatus.FAILED.value: "failed",
}


def _ended_by_claim(session: Session, sid: str, now: datetime) -> tuple[str, str] | None:
    """(provider, outcome) when this claim itself ended the message (expired, opted out, out
    of attempts): it stamped final_at with our `now`. None for a copy that had nothing to do."""
    row = session.execute(
        select(Message.provider, Message.status, Message.final_at).where(Message.sid == sid)
    ).first()
    if row is None or row.final_at != now or row.status not in _CLAIM_ENDINGS:
        return None
    return row.provider, _CLAIM_ENDINGS[row.status]


def _breaker_key(provider_account_id: int) -> str:
    return f"provider-account:{provider_account_id}"


def _healthy(state: Coordination) -> Callable[[int], bool]:
    return lambda provider_account_id: not state.is_open(_breaker_key(provider_account_id))


def _unexpected(exc: Exception) -> TransientProviderError:
    # A bug in an adapter or an SDK surprise: retried like an outage, so attempts stay bounded
    # and the message ends `failed` with the reason instead of sitting in `sending`.
    log.exception("send.unexpected_error")
    return TransientProviderError("error", f"{type(exc).__name__}: {exc}")


def _record_failure(db: Database, owned: Claim, error: ProviderError) -> None:
    settings = get_settings()
    if isinstance(error, TransientProviderError):
        state = shared_state()
        state.failed(_breaker_key(owned.provider_account_id))
        with db.transaction() as session:
            moved = None
            if owned.provider_failures + 1 >= settings.failover_after:
                moved = fail_over(session, owned, settings, utcnow(), _healthy(state))
            # After a failover the next provider is tried at once; otherwise back off.
            delay = schedule_retry(
                session, moved or owned, error, settings, utcnow(), provider_failed=moved is None
            )
            if moved is not None and delay is not None:
                delay = timedelta(0)
        count_send(owned.provider, "failed" if delay is None else "retry")
        if delay is not None:
            publish_sends(app, db, [owned.sid], countdown=delay if delay else None)
        return
    with db.transaction() as session:
        if isinstance(error, RecipientOptedOut):
            add_opt_out(session, owned.owner_id, owned.from_number, owned.to_number, utcnow())
            record_failed(session, owned, error, utcnow(), status=MessageStatus.OPTED_OUT)
        else:
            record_failed(session, owned, error, utcnow())
    count_send(owned.provider, "opted_out" if isinstance(error, RecipientOptedOut) else "failed")


def _request(owned: Claim, public_base_url: str) -> SendRequest:
    validity = max(1, int((owned.expires_at - utcnow()).total_seconds()))
    return SendRequest(
        idempotency_key=owned.sid,
        to=owned.to_number,
        sender=owned.from_number,
        body=owned.body,
        status_callback_url=status_callback_url(owned, public_base_url),
        validity_seconds=validity,
    )


def status_callback_url(owned: Claim, public_base_url: str) -> str:
    """Where the provider reports on this message.

    Our sid rides in the query, so a receipt that overtakes the worker still matches. Vonage
    mostly cannot sign receipts, so their path carries the provider account's secret token."""
    path = f"/callbacks/{owned.provider}"
    if token := owned.credentials.get(CALLBACK_TOKEN):
        path += f"/{token}"
    return f"{public_base_url.rstrip('/')}{path}?messageSid={owned.sid}"


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> int:
    """Publish what is committed but not on the queue; returns how many it published."""
    settings = get_settings()
    db = database()
    total = 0
    while True:
        with db.transaction() as session:
            sids = due_for_publish(session, settings, utcnow())
        if not sids:
            return total
        published = publish_sends(app, db, sids)
        total += len(published)
        log.info("sweep.published", count=len(published))
        # A short batch is the last; a failed publish waits for the next sweep.
        if len(sids) < settings.sweep_batch_size or len(published) < len(sids):
            return total
