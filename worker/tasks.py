"""The Celery tasks: send one message, and sweep for messages the queue does not hold."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import redis
import structlog
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.accounts import CALLBACK_TOKEN
from shared.db import Database
from shared.models import Message, MessageStatus, utcnow
from shared.optout import add_opt_out
from shared.providers import (
    InDoubtProviderError,
    Provider,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    TransientProviderError,
    provider_factory,
    simulator,
    twilio,
    vonage,
)
from shared.sending import (
    Claim,
    Silent,
    claim,
    clear_doubt,
    due_for_publish,
    fail_over,
    look_up_later,
    note_broker_epoch,
    note_lost_in_flight,
    provider_ids_taken,
    published_at_of,
    record_accepted,
    record_failed,
    record_in_doubt,
    record_reconciled,
    release,
    schedule_retry,
    silent_messages,
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


def provider_for(claim_: Claim | Silent) -> Provider:
    """The client of a provider account, built once per process and its current credentials."""
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
    paused = False
    with db.transaction() as session:
        now = utcnow()
        owned = claim(session, sid, settings, now)
        if owned is None:
            ended = _ended_by_claim(session, sid, now)
        elif not owned.in_doubt and _quietly(
            state.is_open, _breaker_key(owned.provider_account_id)
        ):
            # Its provider keeps failing: go straight to a healthy one, if the owner has one;
            # else wait for the breaker instead of spending the call on a dead provider. (Never
            # for a message in doubt: the first provider may have it.)
            moved = fail_over(session, owned, settings, utcnow(), _healthy(state))
            if moved is None:
                release(session, owned, settings.breaker_cooldown, utcnow())
                paused = True
            owned = moved or owned
    if owned is None or paused:
        if ended is not None:
            count_send(*ended)
        if paused:
            assert owned is not None
            count_send(owned.provider, "paused")
        return
    try:
        # Built (and warmed) before the rate-limit slot is taken, so the send leaves on time.
        provider = provider_for(owned)
    except Exception as exc:
        _record_failure(db, owned, exc if isinstance(exc, ProviderError) else _unexpected(exc))
        return
    request = _request(owned, settings.public_base_url)
    if owned.in_doubt and not provider.idempotent and _resolve_doubt(db, owned, provider, request):
        return
    wait = _quietly(state.take, owned.rates(), owned.segments, default=0.0)
    if wait > 0:
        # The sender is at its carrier throughput: come back when a slot is free, and let
        # this thread send other messages meanwhile.
        with db.transaction() as session:
            release(session, owned, timedelta(seconds=wait), utcnow())
        count_send(owned.provider, "throttled")
        _publish_after(db, [sid], timedelta(seconds=wait))
        return
    started = time.perf_counter()
    try:
        result = provider.send(request)
    except Exception as exc:
        error = exc if isinstance(exc, ProviderError) else _unexpected(exc)
        _record_failure(db, owned, error)
        return
    finally:
        SEND_LATENCY.labels(provider=owned.provider).observe(time.perf_counter() - started)
    _record_sent(db, owned, result)
    # After the record, and never able to undo it: a Redis blip here costs a breaker count.
    _quietly(state.succeeded, _breaker_key(owned.provider_account_id))
    count_send(owned.provider, "sent")


def _resolve_doubt(db: Database, owned: Claim, provider: Provider, request: SendRequest) -> bool:
    """A call before this one may have reached the provider, which does not deduplicate.
    Ask the provider where it can be searched; otherwise never send again. True when the
    message is settled (found, or left `in_doubt`); False when it provably is not there."""
    if not provider.searchable:
        with db.transaction() as session:
            record_in_doubt(
                session,
                owned,
                InDoubtProviderError(
                    "in-doubt", "the worker was lost during the provider call; not resent"
                ),
                utcnow(),
            )
        count_send(owned.provider, "in_doubt")
        return True
    # Back to before the doubtful call, with room for the two clocks to disagree.
    since = (owned.doubt_since or utcnow()) - get_settings().provider_timeout - LOOKUP_SKEW
    try:
        with db.transaction() as session:
            taken = provider_ids_taken(session, owned, since)
        found = provider.find(request, since, taken)
    except Exception as exc:
        # Cannot ask now: ask again later, still sending nothing.
        error = exc if isinstance(exc, ProviderError) else _unexpected(exc)
        with db.transaction() as session:
            look_up_later(session, owned, error, get_settings(), utcnow())
        _publish_after(db, [owned.sid], get_settings().in_doubt_lookup_after)
        count_send(owned.provider, "in_doubt")
        return True
    if found is None:
        log.info("send.in_doubt_resolved", found=False)
        with db.transaction() as session:
            clear_doubt(session, owned)
        return False
    log.info("send.in_doubt_resolved", found=True, provider_message_id=found.provider_message_id)
    _record_sent(db, owned, found)
    count_send(owned.provider, "sent")
    return True


# A provider's clock and ours may disagree by this much when it stamps a message's time.
LOOKUP_SKEW = timedelta(minutes=2)
# Countdowns the broker holds for us stay this short (well inside its visibility timeout);
# anything longer waits in the database and the sweeper publishes it when due.
MAX_COUNTDOWN = timedelta(seconds=10)


def _publish_after(db: Database, sids: list[str], delay: timedelta | None) -> None:
    if delay is None or delay <= MAX_COUNTDOWN:
        publish_sends(app, db, sids, countdown=delay if delay else None)


def _record_sent(db: Database, owned: Claim, result: SendResult) -> None:
    """The provider has it: record that, trying again while the database is briefly away,
    since this is the one thing we must not forget (the lease outlives these tries)."""
    deadline = time.monotonic() + get_settings().send_lease.total_seconds() / 2
    while True:
        try:
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
            return
        except (OperationalError, InterfaceError):
            if time.monotonic() > deadline:
                # Left to the lease: the next claim finds the message in doubt and resolves it.
                raise
            log.warning("send.record_retry")
            time.sleep(0.5)


_T = TypeVar("_T")


def _quietly(call: Callable[..., _T], *args: Any, default: _T | None = None) -> _T:
    """Rate limits and breakers are advice kept in Redis: when Redis is away, send anyway
    (a limit briefly not enforced) rather than lose or hold the message."""
    try:
        return call(*args)
    except Exception:
        log.warning("coordination.unavailable", call=getattr(call, "__name__", str(call)))
        return cast(_T, default if default is not None else False)


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


class AdapterBug(TransientProviderError):
    """An exception no provider error type covers: retried a bounded number of times."""


def _unexpected(exc: Exception) -> TransientProviderError:
    # Retried like an outage at first, so the message ends `failed` with the reason instead
    # of sitting in `sending`.
    log.exception("send.unexpected_error")
    return AdapterBug("error", f"{type(exc).__name__}: {exc}")


def _record_failure(db: Database, owned: Claim, error: ProviderError) -> None:
    settings = get_settings()
    if isinstance(error, InDoubtProviderError):
        _quietly(shared_state().failed, _breaker_key(owned.provider_account_id))
        provider = provider_for(owned)
        if provider.idempotent:
            # The provider deduplicates on our key: sending again cannot send twice, but only
            # through this provider (another would not know our key).
            with db.transaction() as session:
                delay = schedule_retry(session, owned, error, settings, utcnow(), in_doubt=True)
            count_send(owned.provider, "expired" if delay is None else "retry")
            if delay is not None:
                _publish_after(db, [owned.sid], delay)
            return
        with db.transaction() as session:
            if provider.searchable:
                delay = look_up_later(session, owned, error, settings, utcnow())
            else:
                record_in_doubt(session, owned, error, utcnow())
                delay = None
        count_send(owned.provider, "in_doubt")
        if delay is not None:
            _publish_after(db, [owned.sid], delay)
        return
    if isinstance(error, AdapterBug) and owned.attempts >= owned.max_attempts:
        # Not an outage that time heals: a bug in an adapter or an SDK surprise gets a few
        # tries, then ends `failed` with the reason instead of looping until validity ends.
        with db.transaction() as session:
            record_failed(session, owned, error, utcnow())
        count_send(owned.provider, "failed")
        return
    if isinstance(error, TransientProviderError):
        state = shared_state()
        _quietly(state.failed, _breaker_key(owned.provider_account_id))
        with db.transaction() as session:
            moved = None
            # Never for a message in doubt: the provider it was sent to may have it.
            if not owned.in_doubt and owned.provider_failures + 1 >= settings.failover_after:
                moved = fail_over(session, owned, settings, utcnow(), _healthy(state))
            # After a failover the next provider is tried at once; otherwise back off.
            delay = schedule_retry(
                session, moved or owned, error, settings, utcnow(), provider_failed=moved is None
            )
            if moved is not None and delay is not None:
                delay = timedelta(0)
        count_send(owned.provider, "expired" if delay is None else "retry")
        if delay is not None:
            _publish_after(db, [owned.sid], delay)
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
    """Publish what is committed but not on the queue, and settle messages whose provider
    went quiet; returns how many it published."""
    settings = get_settings()
    db = database()
    _check_broker_epoch(db)
    total = 0
    while True:
        with db.transaction() as session:
            sids = due_for_publish(session, settings, utcnow())
        if not sids:
            break
        published = publish_sends(app, db, sids)
        total += len(published)
        log.info("sweep.published", count=len(published))
        # A short batch is the last; a failed publish waits for the next sweep.
        if len(sids) < settings.sweep_batch_size or len(published) < len(sids):
            break
    reconcile(db)
    return total


BROKER_EPOCH_KEY = "smsd:broker-epoch"
_epoch_client: redis.Redis | None = None


def _check_broker_epoch(db: Database) -> None:
    """Notice a Redis broker that lost what it held (a restart without persistence, a
    failover to an empty replica): its epoch key is gone, so a new one is born here."""
    global _epoch_client
    settings = get_settings()
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return  # the SQL broker and RabbitMQ keep their queues through restarts
    try:
        if _epoch_client is None:
            _epoch_client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
        _epoch_client.set(BROKER_EPOCH_KEY, f"{time.time():.3f}:{uuid.uuid4().hex}", nx=True)
        epoch = _epoch_client.get(BROKER_EPOCH_KEY)
    except redis.RedisError:
        log.warning("sweep.broker_unreachable")
        return
    if epoch is None:
        return
    value = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
    born = datetime.fromtimestamp(float(value.partition(":")[0]), UTC)
    with db.transaction() as session:
        note_broker_epoch(session, value, born, utcnow())
    _check_queue_head(db, _epoch_client)


def _check_queue_head(db: Database, client: redis.Redis) -> None:
    """Find messages lost in flight: published, never claimed, and older than the oldest task
    still waiting on the queue (first in, first out: whatever was published before it was
    taken) and than anything a live worker may still hold unacknowledged."""
    settings = get_settings()
    grace = settings.broker_visibility_timeout + 2 * settings.sweep_interval + MAX_COUNTDOWN
    cutoff = utcnow() - grace
    try:
        oldest = client.lindex(settings.send_queue, -1)
    except redis.RedisError:
        return
    head = _sid_of_task(oldest) if oldest is not None else None
    with db.transaction() as session:
        if head is not None:
            head_published = published_at_of(session, head)
            if head_published is None:
                return  # cannot place the head in time: judge nothing this round
            cutoff = min(cutoff, head_published)
        note_lost_in_flight(session, cutoff)


def _sid_of_task(raw: bytes | str) -> str | None:
    """The messageSid a Celery send task on a Redis list carries (kombu's JSON envelope, the
    body base64 JSON `[args, kwargs, embed]`)."""
    try:
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        sid = body[0][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return sid if isinstance(sid, str) else None


# How each provider's status words map onto ours, for what the reconciler hears.
_STATUS_WORDS = {
    "twilio": twilio.TWILIO_STATUSES,
    "vonage": vonage.VONAGE_STATUSES,
    "simulator": simulator.SIMULATOR_STATUSES,
}


def reconcile(db: Database) -> int:
    """Ask the provider about messages with no final word after SMSD_RECONCILE_AFTER (where
    it can be asked), and end those past SMSD_RECEIPT_WINDOW `unknown`; returns how many
    changed status."""
    settings = get_settings()
    with db.transaction() as session:
        silent = silent_messages(session, settings, utcnow())
    changed = 0
    for message in silent:
        word: str | None = None
        if message.provider_message_id:
            try:
                word = provider_for(message).status_of(message.provider_message_id)
            except Exception as exc:
                log.warning("reconcile.ask_failed", messageSid=message.sid, error=str(exc))
        status = _STATUS_WORDS.get(message.provider, {}).get((word or "").lower())
        with db.transaction() as session:
            applied = record_reconciled(session, message, status, word, settings, utcnow())
        if applied is not None:
            changed += 1
            log.info("reconcile.settled", messageSid=message.sid, status=applied.value)
    return changed
