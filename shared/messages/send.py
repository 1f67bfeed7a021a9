"""The send use case: `Sender.send(sid)` takes one message from `queued` to its provider and
says how that ended. Safe to run any number of times for one sid: the claim decides whether
anything is left to do.

Every rule of a send lives here, in this order: claim; skip a provider whose circuit is open
(fail over, or wait for it); settle an earlier call that may have reached the provider before
calling again; take the sender's rate-limit slot; call the provider; record what it said
(sent, retry with backoff, fail over after repeated failures, in doubt, failed, opted out)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, TypeVar, cast

import structlog
from celery import Celery
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.accounts.access import CALLBACK_TOKEN
from shared.core.db import Database
from shared.core.loops import new_event_loop
from shared.core.models import MessageStatus, utcnow
from shared.core.settings import Settings
from shared.messages.claims import (
    Claim,
    NotClaimed,
    clear_doubt,
    fail_over,
    look_up_later,
    provider_ids_taken,
    record_accepted,
    record_failed,
    record_in_doubt,
    release,
    schedule_retry,
    take,
    take_batch,
)
from shared.messages.lifecycle import StatusReport, sent_from_sending_batch
from shared.messages.optout import add_opt_out
from shared.messages.outbox import publish_after
from shared.providers.circuit_breakers import CircuitBreakers
from shared.providers.interface import (
    InDoubtProviderError,
    Provider,
    ProviderError,
    RecipientOptedOut,
    SendRequest,
    SendResult,
    SendsAsync,
    TransientProviderError,
)
from shared.providers.rate_limits import RateLimits
from shared.providers.registry import ProviderClients

log = structlog.get_logger(__name__)


class Outcome(StrEnum):
    """How one run of a send ended, for the worker's metrics."""

    SENT = "sent"
    # Failed transiently and scheduled again.
    RETRY = "retry"
    FAILED = "failed"
    OPTED_OUT = "opted_out"
    EXPIRED = "expired"
    # Back on the queue for the sender's rate-limit slot.
    THROTTLED = "throttled"
    # A call that may have reached the provider: looked up later, or never sent again.
    IN_DOUBT = "in_doubt"
    # Its provider's circuit is open and no other is healthy: the message waits.
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """`outcome` None: nothing to do (sent already, held by another worker, unknown)."""

    outcome: Outcome | None = None
    provider: str | None = None
    # How long the provider call took, when one was made.
    provider_seconds: float | None = None


# What a claim that sends nothing did to the message.
_CLAIM_ENDINGS = {
    MessageStatus.EXPIRED: Outcome.EXPIRED,
    MessageStatus.OPTED_OUT: Outcome.OPTED_OUT,
    MessageStatus.FAILED: Outcome.FAILED,
}
# A provider's clock and ours may disagree by this much when it stamps a message's time.
LOOKUP_SKEW = timedelta(minutes=2)


class AdapterBug(TransientProviderError):
    """An exception no provider error type covers: retried a bounded number of times."""


class BatchInterrupted(Exception):
    """The database failed some messages of a batch (`error`, the first): the others were
    sent and recorded, and `outcomes` says how each ended, as `send_batch` would have."""

    def __init__(self, outcomes: list[SendOutcome], error: Exception) -> None:
        super().__init__(str(error))
        self.outcomes = outcomes
        self.error = error


@dataclass(frozen=True, slots=True)
class _Accepted:
    """The provider has the message, not yet recorded. `provider_seconds`: how long the call
    took; None when an earlier call in doubt was found at the provider (no call now)."""

    owned: Claim
    result: SendResult
    provider_seconds: float | None

    def outcome(self) -> SendOutcome:
        return SendOutcome(Outcome.SENT, self.owned.provider, self.provider_seconds)


def _sent_report(owned: Claim, result: SendResult) -> StatusReport:
    """The worker's own `sent`, as `record_accepted` reports it."""
    return StatusReport(
        MessageStatus.SENT,
        source="worker",
        provider=owned.provider,
        provider_message_id=result.provider_message_id,
        provider_status=result.provider_status,
    )


class Sender:
    """The send use case for one process: its database, the broker to re-publish through, the
    provider clients, and the rate limits and circuit breakers every worker shares."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        celery: Celery,
        providers: ProviderClients,
        rate_limits: RateLimits,
        breakers: CircuitBreakers,
    ) -> None:
        self.settings = settings
        self.db = db
        self.celery = celery
        self.providers = providers
        self.rate_limits = rate_limits
        self.breakers = breakers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._slots = _Slots(max(1, settings.worker_send_threads))
        self._loop = _SendLoop()

    def send(self, sid: str) -> SendOutcome:
        """Send one message through its provider, or do nothing if it is not ours to send."""
        with self.db.transaction() as session:
            taken, paused = self._steer(session, take(session, sid, self.settings, utcnow()))
        if isinstance(taken, NotClaimed):
            ending = _CLAIM_ENDINGS.get(taken.ended) if taken.ended else None
            return SendOutcome(ending, taken.provider)
        if paused:
            return SendOutcome(Outcome.PAUSED, taken.provider)
        return self._finish(self._deliver(taken))

    def send_batch(self, sids: Sequence[str]) -> list[SendOutcome]:
        """Send a batch of messages, each by the rules of `send`; how each ended, in order.

        All of them are claimed in one statement (PostgreSQL), sent concurrently on this
        process's send threads, and the plain `sent`s recorded in a few statements for the
        whole batch. Sids the claim did not take (already taken, a dead worker's lease,
        expired, opted out, unknown; every sid on SQLite) take `send`'s way, on the same
        threads. One message that fails in a way nobody foresaw fails alone.

        Raises `BatchInterrupted` when the database failed some messages (the others are
        recorded): the task runs again, and the claims decide what is left to do."""
        wanted = list(dict.fromkeys(sids))
        pool = self._send_pool()
        jobs: dict[str, Future[SendOutcome | _Accepted]] = {}
        ended: dict[str, SendOutcome] = {}
        loop_accepted: list[_Accepted] = []
        taken = 0
        while taken < len(wanted):
            # Claimed no faster than send threads come free (one statement for the whole batch
            # when they are): a claimed message never waits for a thread, since its lease runs
            # from the claim, and the claims of many batches cannot outrun the pool.
            count = self._slots.take(len(wanted) - taken)
            chunk = wanted[taken : taken + count]
            taken += count
            try:
                with self.db.transaction() as session:
                    claims = take_batch(session, chunk, self.settings, utcnow())
                    is_open = _memoised(self.breakers.is_open)
                    steered = {
                        sid: self._steer(session, owned, is_open) for sid, owned in claims.items()
                    }
            except BaseException:
                self._slots.give(count)
                raise
            claimed_at = time.monotonic()
            on_loop: list[Claim] = []
            for sid in chunk:
                if sid not in steered:
                    jobs[sid] = pool.submit(
                        self._on_slot, contextvars.copy_context(), self._send_alone, sid
                    )
                    continue
                owned, paused = steered[sid]
                if paused:
                    self._slots.give(1)
                    ended[sid] = SendOutcome(Outcome.PAUSED, owned.provider)
                    continue
                assert isinstance(owned, Claim)
                if self._sends_async(owned):
                    on_loop.append(owned)
                    continue
                jobs[sid] = pool.submit(
                    self._on_slot,
                    contextvars.copy_context(),
                    self._deliver_claimed,
                    owned,
                    claimed_at,
                )
            if on_loop:
                try:
                    for sid, answer in self._deliver_async(on_loop).items():
                        if isinstance(answer, _Accepted):
                            loop_accepted.append(answer)
                        else:
                            ended[sid] = answer
                finally:
                    self._slots.give(len(on_loop))
        accepted: list[_Accepted] = list(loop_accepted)
        database_errors: list[Exception] = []
        for sid, job in jobs.items():
            try:
                done = job.result()
            except (OperationalError, InterfaceError) as exc:
                database_errors.append(exc)
                ended[sid] = SendOutcome()
                continue
            except Exception:
                # Not even its failure could be recorded: left to its lease (the next claim
                # finds it in doubt if it was claimed), the rest of the batch goes on.
                log.exception("send.batch_message_error", messageSid=sid)
                ended[sid] = SendOutcome()
                continue
            if isinstance(done, _Accepted):
                accepted.append(done)
            else:
                ended[sid] = done
        ended.update(self._finish_batch(accepted))
        outcomes = [ended.pop(sid, SendOutcome()) for sid in sids]
        if database_errors:
            raise BatchInterrupted(outcomes, database_errors[0])
        return outcomes

    def _steer(
        self,
        session: Session,
        taken: Claim | NotClaimed,
        is_open: Callable[[int], bool] | None = None,
    ) -> tuple[Claim | NotClaimed, bool]:
        """In the claim's transaction: skip a provider whose circuit is open. The claim to
        send (moved to a healthy provider, if the owner has one), and whether it waits for
        the breaker instead (handed back)."""
        if (
            isinstance(taken, Claim)
            and not taken.in_doubt
            and _quietly(is_open or self.breakers.is_open, taken.provider_account_id)
        ):
            # Its provider keeps failing: go straight to a healthy one, if the owner has
            # one; else wait for the breaker instead of spending the call on a dead
            # provider. (Never for a message in doubt: the first provider may have it.)
            moved = fail_over(session, taken, self.settings, utcnow(), self._healthy)
            if moved is None:
                release(session, taken, self.settings.breaker_cooldown, utcnow())
                return taken, True
            return moved, False
        return taken, False

    def _deliver(self, owned: Claim) -> SendOutcome | _Accepted:
        """Everything after the claim up to the record of a success: settle an earlier call
        in doubt, take the rate-limit slot, call the provider, record a failure. A success
        is returned for the caller to record (`_finish`, or `_finish_batch` for many)."""
        ready = self._ready(owned)
        if isinstance(ready, SendOutcome | _Accepted):
            return ready  # no call to make: settled, throttled, or found at the provider
        provider, request = ready
        started = time.perf_counter()
        try:
            result = provider.send(request)
        except Exception as exc:
            return self._went_wrong(owned, exc, time.perf_counter() - started)
        return _Accepted(owned, result, time.perf_counter() - started)

    def _ready(self, owned: Claim) -> SendOutcome | _Accepted | tuple[Provider, SendRequest]:
        """What comes before the provider call: its client and request, an earlier call in
        doubt settled, the sender's rate-limit slot taken. An outcome when there is to be no
        call (settled, throttled, or the request could not even be built); a success to record
        when the message was found at the provider after all."""
        try:
            # Built (and warmed) before the rate-limit slot is taken, so the send leaves on time.
            provider = self._client(owned)
            request = self._request(owned)
        except Exception as exc:
            return self._failed(owned, exc if isinstance(exc, ProviderError) else _unexpected(exc))
        if owned.in_doubt and not provider.idempotent:
            settled = self._resolve_doubt(owned, provider, request)
            if settled is not None:
                return settled
        wait = _quietly(self.rate_limits.take, owned.rates(), owned.segments, default=0.0)
        if wait > 0:
            # The sender is at its carrier throughput: come back when a slot is free, and let
            # this thread send other messages meanwhile.
            with self.db.transaction() as session:
                release(session, owned, timedelta(seconds=wait), utcnow())
            self._publish_after(owned, timedelta(seconds=wait))
            return SendOutcome(Outcome.THROTTLED, owned.provider)
        return provider, request

    def _went_wrong(self, owned: Claim, exc: Exception, seconds: float) -> SendOutcome:
        """Record a provider call that raised, by what it raised."""
        error = exc if isinstance(exc, ProviderError) else _unexpected(exc)
        return SendOutcome(self._failed(owned, error).outcome, owned.provider, seconds)

    def _deliver_async(self, claims: list[Claim]) -> dict[str, SendOutcome | _Accepted]:
        """`_deliver` for a batch's messages whose clients send on an event loop: each one
        made ready here, their calls side by side on the process's send loop, then each
        answer handled as `_deliver` handles it."""
        done: dict[str, SendOutcome | _Accepted] = {}
        calls: list[tuple[Claim, SendsAsync, SendRequest]] = []
        for owned in claims:
            try:
                ready = self._ready(owned)
            except Exception:
                log.exception("send.batch_message_error", messageSid=owned.sid)
                done[owned.sid] = SendOutcome()  # left to its lease, as in `send_batch`
                continue
            if isinstance(ready, SendOutcome | _Accepted):
                done[owned.sid] = ready
            else:
                provider, request = ready
                assert isinstance(provider, SendsAsync)
                calls.append((owned, provider, request))
        if calls:
            answers = self._loop.run(_send_all([(p, r) for _, p, r in calls]))
            for (owned, _, _), (answer, seconds) in zip(calls, answers, strict=True):
                if isinstance(answer, SendResult):
                    done[owned.sid] = _Accepted(owned, answer, seconds)
                else:
                    done[owned.sid] = self._went_wrong(owned, answer, seconds)
        return done

    def _finish(self, done: SendOutcome | _Accepted) -> SendOutcome:
        """Record one success (a failure is recorded already)."""
        if isinstance(done, SendOutcome):
            return done
        self._record_sent(done.owned, done.result)
        if done.provider_seconds is not None:
            # After the record, and never able to undo it: a Redis blip here costs a breaker
            # count.
            _quietly(self.breakers.succeeded, done.owned.provider_account_id)
        return done.outcome()

    def _finish_batch(self, accepted: Sequence[_Accepted]) -> dict[str, SendOutcome]:
        """Record a batch's successes: the plain ones in a few statements for all of them,
        the others (a callback got there first, a message the provider took as several
        parts) one by one, the careful way."""
        plain = {
            done.owned.sid: done
            for done in accepted
            if len(done.result.parts) <= 1 and not done.result.unsent_parts
        }
        moved: set[str] = set()
        if plain and self.db.engine.dialect.name == "postgresql":
            reports = {sid: _sent_report(done.owned, done.result) for sid, done in plain.items()}
            accounts = {sid: done.owned.tenant_id for sid, done in plain.items()}

            def record() -> None:
                nonlocal moved
                with self.db.transaction() as session:
                    done = sent_from_sending_batch(session, reports, utcnow(), accounts=accounts)
                moved = done  # committed

            self._until_recorded(record)
        for done in accepted:
            if done.owned.sid not in moved:
                self._record_sent(done.owned, done.result)
        # After the record, and never able to undo it: once per provider of the batch.
        for provider_account_id in dict.fromkeys(
            done.owned.provider_account_id for done in accepted if done.provider_seconds is not None
        ):
            _quietly(self.breakers.succeeded, provider_account_id)
        return {done.owned.sid: done.outcome() for done in accepted}

    def _send_alone(self, sid: str) -> SendOutcome | _Accepted:
        """A sid of a batch that the batch claim did not take: `send`'s way, on a send thread."""
        structlog.contextvars.bind_contextvars(messageSid=sid)
        return self.send(sid)

    def _deliver_claimed(self, owned: Claim, claimed_at: float) -> SendOutcome | _Accepted:
        """A claimed message of a batch, on a send thread."""
        structlog.contextvars.bind_contextvars(
            messageSid=owned.sid, account=owned.tenant_id, campaign=owned.campaign_id
        )
        if time.monotonic() - claimed_at > self.settings.send_lease.total_seconds() / 4:
            # It waited for a thread while the process was busy: its lease must outlast the
            # call and the record, so it goes back on the queue, its attempt not spent.
            log.warning("send.batch_waited", seconds=round(time.monotonic() - claimed_at, 3))
            with self.db.transaction() as session:
                release(session, owned, timedelta(0), utcnow())
            self._publish_after(owned, None)
            return SendOutcome(Outcome.THROTTLED, owned.provider)
        return self._deliver(owned)

    def _on_slot(
        self,
        context: contextvars.Context,
        work: Callable[..., SendOutcome | _Accepted],
        *args: Any,
    ) -> SendOutcome | _Accepted:
        """Run `work` on a send thread in the batch's logging context, then free its slot."""
        try:
            return context.run(work, *args)
        finally:
            self._slots.give(1)

    def _sends_async(self, owned: Claim) -> bool:
        try:
            return isinstance(self._client(owned), SendsAsync)
        except Exception:
            return False  # `_deliver` records why the client cannot be built

    def _send_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=max(1, self.settings.worker_send_threads),
                    thread_name_prefix="send",
                )
            return self._pool

    def _client(self, owned: Claim) -> Provider:
        return self.providers.client(owned.provider, owned.provider_account_id, owned.credentials)

    def _healthy(self, provider_account_id: int) -> bool:
        return not self.breakers.is_open(provider_account_id)

    def _publish_after(self, owned: Claim, delay: timedelta | None) -> None:
        if owned.batch_id is not None:
            # Handed back with its next attempt's time and no mark: the bulk pump publishes it
            # when due, in its tenant's turn (shared/messages/lanes.py), not ahead of the lane.
            return
        publish_after(self.celery, self.db, [owned.sid], delay)

    def _resolve_doubt(
        self, owned: Claim, provider: Provider, request: SendRequest
    ) -> SendOutcome | _Accepted | None:
        """A call before this one may have reached the provider, which does not deduplicate.
        Ask the provider where it can be searched; otherwise never send again. The outcome when
        the message is settled (found, or left `in_doubt`); None when it provably is not
        there, so it is sent now."""
        if not provider.searchable:
            with self.db.transaction() as session:
                record_in_doubt(
                    session,
                    owned,
                    InDoubtProviderError(
                        "in-doubt", "the worker was lost during the provider call; not resent"
                    ),
                    utcnow(),
                )
            return SendOutcome(Outcome.IN_DOUBT, owned.provider)
        # Back to before the doubtful call, with room for the two clocks to disagree.
        since = (owned.doubt_since or utcnow()) - self.settings.provider_timeout - LOOKUP_SKEW
        try:
            with self.db.transaction() as session:
                taken = provider_ids_taken(session, owned, since)
            found = provider.find(request, since, taken)
        except Exception as exc:
            # Cannot ask now: ask again later, still sending nothing.
            error = exc if isinstance(exc, ProviderError) else _unexpected(exc)
            with self.db.transaction() as session:
                look_up_later(session, owned, error, self.settings, utcnow())
            self._publish_after(owned, self.settings.in_doubt_lookup_after)
            return SendOutcome(Outcome.IN_DOUBT, owned.provider)
        if found is None:
            log.info("send.in_doubt_resolved", found=False)
            with self.db.transaction() as session:
                clear_doubt(session, owned)
            return None
        log.info(
            "send.in_doubt_resolved", found=True, provider_message_id=found.provider_message_id
        )
        return _Accepted(owned, found, None)

    def _record_sent(self, owned: Claim, result: SendResult) -> None:
        """The provider has it: record that, trying again while the database is briefly away,
        since this is the one thing we must not forget (the lease outlives these tries)."""

        def record() -> None:
            with self.db.transaction() as session:
                record_accepted(
                    session,
                    owned,
                    result.provider_message_id,
                    result.provider_status,
                    utcnow(),
                    parts=result.parts,
                    unsent_parts=result.unsent_parts,
                )

        self._until_recorded(record)

    def _until_recorded(self, record: Callable[[], None]) -> None:
        """Run `record`, again while the database is briefly away."""
        deadline = time.monotonic() + self.settings.send_lease.total_seconds() / 2
        while True:
            try:
                record()
                return
            except (OperationalError, InterfaceError):
                if time.monotonic() > deadline:
                    # Left to the lease: the next claim finds the message in doubt and
                    # resolves it.
                    raise
                log.warning("send.record_retry")
                time.sleep(0.5)

    def _failed(self, owned: Claim, error: ProviderError) -> SendOutcome:
        """Record a provider call that did not (or may not) deliver the message to it."""
        settings = self.settings
        if isinstance(error, InDoubtProviderError):
            _quietly(self.breakers.failed, owned.provider_account_id)
            provider = self._client(owned)
            if provider.idempotent:
                # The provider deduplicates on our key: sending again cannot send twice, but
                # only through this provider (another would not know our key).
                with self.db.transaction() as session:
                    delay = schedule_retry(session, owned, error, settings, utcnow(), in_doubt=True)
                if delay is None:
                    return SendOutcome(Outcome.EXPIRED, owned.provider)
                self._publish_after(owned, delay)
                return SendOutcome(Outcome.RETRY, owned.provider)
            with self.db.transaction() as session:
                if provider.searchable:
                    lookup: timedelta | None = look_up_later(
                        session, owned, error, settings, utcnow()
                    )
                else:
                    record_in_doubt(session, owned, error, utcnow())
                    lookup = None
            if lookup is not None:
                self._publish_after(owned, lookup)
            return SendOutcome(Outcome.IN_DOUBT, owned.provider)
        if isinstance(error, AdapterBug) and owned.attempts >= owned.max_attempts:
            # Not an outage that time heals: a bug in an adapter or an SDK surprise gets a few
            # tries, then ends `failed` with the reason instead of looping until validity ends.
            with self.db.transaction() as session:
                record_failed(session, owned, error, utcnow())
            return SendOutcome(Outcome.FAILED, owned.provider)
        if isinstance(error, TransientProviderError):
            _quietly(self.breakers.failed, owned.provider_account_id)
            with self.db.transaction() as session:
                moved = None
                # Never for a message in doubt: the provider it was sent to may have it.
                if not owned.in_doubt and owned.provider_failures + 1 >= settings.failover_after:
                    moved = fail_over(session, owned, settings, utcnow(), self._healthy)
                # After a failover the next provider is tried at once; otherwise back off.
                delay = schedule_retry(
                    session,
                    moved or owned,
                    error,
                    settings,
                    utcnow(),
                    provider_failed=moved is None,
                )
                if moved is not None and delay is not None:
                    delay = timedelta(0)
            if delay is None:
                return SendOutcome(Outcome.EXPIRED, owned.provider)
            self._publish_after(owned, delay)
            return SendOutcome(Outcome.RETRY, owned.provider)
        opted_out = isinstance(error, RecipientOptedOut)
        with self.db.transaction() as session:
            if opted_out:
                add_opt_out(session, owned.owner_id, owned.from_number, owned.to_number, utcnow())
                record_failed(session, owned, error, utcnow(), status=MessageStatus.OPTED_OUT)
            else:
                record_failed(session, owned, error, utcnow())
        return SendOutcome(Outcome.OPTED_OUT if opted_out else Outcome.FAILED, owned.provider)

    def _request(self, owned: Claim) -> SendRequest:
        validity = max(1, int((owned.expires_at - utcnow()).total_seconds()))
        return SendRequest(
            idempotency_key=owned.sid,
            to=owned.to_number,
            sender=owned.from_number,
            body=owned.body,
            status_callback_url=status_callback_url(owned, self.settings.public_base_url),
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


_T = TypeVar("_T")


def _quietly(call: Callable[..., _T], *args: Any, default: _T | None = None) -> _T:
    """Rate limits and breakers are advice kept in Redis: when Redis is away, send anyway
    (a limit briefly not enforced) rather than lose or hold the message."""
    try:
        return call(*args)
    except Exception:
        log.warning("coordination.unavailable", call=getattr(call, "__name__", str(call)))
        return cast(_T, default if default is not None else False)


def _memoised(call: Callable[[int], bool]) -> Callable[[int], bool]:
    """`call`, asked once per provider account (a batch's breakers, read at its claim)."""
    seen: dict[int, bool] = {}

    def is_open(provider_account_id: int) -> bool:
        if provider_account_id not in seen:
            seen[provider_account_id] = call(provider_account_id)
        return seen[provider_account_id]

    return is_open


def _unexpected(exc: Exception) -> TransientProviderError:
    # Retried like an outage at first, so the message ends `failed` with the reason instead
    # of sitting in `sending`.
    log.exception("send.unexpected_error")
    return AdapterBug("error", f"{type(exc).__name__}: {exc}")


class _Slots:
    """The send threads not yet promised to a claimed message."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._changed = threading.Condition()

    def take(self, most: int) -> int:
        """Promise between 1 and `most` slots, waiting until at least one is free."""
        with self._changed:
            while self._free == 0:
                self._changed.wait()
            count = min(self._free, most)
            self._free -= count
            return count

    def give(self, count: int) -> None:
        with self._changed:
            self._free += count
            # Each waiter woken takes at least one slot (or finds them taken by a caller that
            # did not wait): waking more than `count` of the Celery threads waiting here only
            # has them contend for the GIL to sleep again.
            self._changed.notify(count)


class _SendLoop:
    """The process's event loop for provider calls, on a thread of its own, started on first
    use: a batch's async sends run there side by side."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, work: Coroutine[Any, Any, _T]) -> _T:
        with self._lock:
            if self._loop is None:
                self._loop = new_event_loop()
                threading.Thread(
                    target=self._loop.run_forever, name="send-loop", daemon=True
                ).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(work, loop).result()


async def _send_all(
    calls: list[tuple[SendsAsync, SendRequest]],
) -> list[tuple[SendResult | Exception, float]]:
    """Every call at once; each one's answer (or what it raised) and how long it took."""

    async def timed(
        provider: SendsAsync, request: SendRequest
    ) -> tuple[SendResult | Exception, float]:
        started = time.perf_counter()
        try:
            return await provider.send_async(request), time.perf_counter() - started
        except Exception as exc:
            return exc, time.perf_counter() - started

    return list(await asyncio.gather(*(timed(p, r) for p, r in calls)))
