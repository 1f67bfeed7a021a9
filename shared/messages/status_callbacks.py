"""Status callbacks: every status change of a message that has a statusCallback URL, POSTed
there as JSON, signed, in order, at least once, retried with backoff.

A trigger on `messages` queues each change (`status_callbacks`, migration 0012) in the very
transaction that makes it, whichever path made it; nothing here is on the send path, which
never waits for a callback. The deliverer (the `sms.status_callbacks` task, every
SMSD_STATUS_CALLBACK_INTERVAL, on a queue of its own) then:

1. takes a lease on the due callbacks, at most one per message and only a message's oldest
   undone one: a message's next change waits until the one before it was delivered or given
   up, so a receiver sees a message's changes in the order they happened;
2. POSTs them concurrently, each to an address it has just checked (`callback_urls`), without
   following redirects, within SMSD_STATUS_CALLBACK_TIMEOUT;
3. records each attempt and settles each callback: a 2xx delivered; anything else (an address
   the operator does not allow included) tried again after a doubling delay, given up once
   SMSD_STATUS_CALLBACK_RETRY_FOR has passed since the change.

A deliverer that dies between a POST and its record loses its lease, and the callback is
POSTed again: at least once, never lost. A run's lease outlasts everything the run can do
with what it took, so no second deliverer POSTs a change while the first still may (which
could reorder a message's changes at the receiver). `Smsd-Event-Id` (and the body's
`eventId`) is the same on every attempt, so a receiver can drop a repeat. One run at a time
per process, so slow receivers hold one thread of a worker, never all of them.

The signature: `Smsd-Signature: t=<unix seconds>,v1=<hex>`, where the hex is
HMAC-SHA256(account's webhook secret, "<t>." + body); during a secret rotation's overlap one
`v1=` per secret that signs (shared/accounts/webhook_secrets.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from shared.accounts.webhook_secrets import signing_secrets
from shared.core.db import Database
from shared.core.models import (
    Account,
    Message,
    StatusCallback,
    StatusCallbackAttempt,
    table_of,
    utcnow,
)
from shared.core.settings import Settings
from shared.text.callback_urls import (
    IPAddress,
    IPNetwork,
    allowed_networks,
    literal_address,
    parse_callback_url,
    refused_address,
    shown_url,
)

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "Smsd-Signature"
EVENT_ID_HEADER = "Smsd-Event-Id"
USER_AGENT = "sms-dispatch-status-callback/1"
# How many POSTs one run keeps in flight.
CONCURRENCY = 50

DELIVERED = "delivered"
RETRYING = "retrying"
GIVEN_UP = "given_up"
REFUSED = "refused"
# What an attempt whose name has no address the service may reach says, refused or not
# found alike (which of the two would tell the account what the operator's network holds).
NO_ALLOWED_ADDRESS = "no address the service may reach"

_callbacks = table_of(StatusCallback)
_attempts = table_of(StatusCallbackAttempt)
_messages = table_of(Message)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 over `<timestamp>.<body>`, as hex."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets: list[str], timestamp: int, body: bytes) -> str:
    """`t=<timestamp>,v1=<hex>[,v1=<hex>...]`: one signature per secret that signs."""
    return ",".join([f"t={timestamp}", *(f"v1={sign(s, timestamp, body)}" for s in secrets)])


@dataclass(frozen=True, slots=True)
class Due:
    """A callback taken for one attempt, with what its body says."""

    id: int
    account_id: int
    url: str
    attempt: int
    changed_at: datetime
    lease: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one POST went."""

    due: Due
    at: datetime
    response_status: int | None
    # What went wrong, as the message's account may see it (never an internal address).
    error: str | None
    duration_ms: int
    # The address was one the operator does not allow (counted apart, for the operator).
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.response_status is not None and 200 <= self.response_status < 300


def _due_statement(now: datetime, lease: datetime, limit: int) -> Any:
    earlier = aliased(StatusCallback)
    due = (
        select(StatusCallback.id)
        .where(
            StatusCallback.done_at.is_(None),
            StatusCallback.next_attempt_at <= now,
            or_(StatusCallback.leased_until.is_(None), StatusCallback.leased_until <= now),
            # Only a message's oldest undone change: the next waits for it (order per message).
            ~exists().where(
                earlier.message_sid == StatusCallback.message_sid,
                earlier.id < StatusCallback.id,
                # `outcome IS NULL` is `done_at IS NULL` (both are set together) in a form the
                # pending index does not match: on a young table whose statistics lag, the
                # planner ANDed that whole index into every probe (half a second a claim at
                # 3,000 pending); this way each probe is one look into (message_sid, id).
                earlier.outcome.is_(None),
            ),
        )
        .order_by(StatusCallback.next_attempt_at, StatusCallback.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=StatusCallback)
    )
    return (
        update(_callbacks)
        .where(_callbacks.c.id.in_(due.scalar_subquery()))
        .values(leased_until=lease, attempts=_callbacks.c.attempts + 1)
        .returning(
            _callbacks.c.id,
            _callbacks.c.message_sid,
            _callbacks.c.account_id,
            _callbacks.c.url,
            _callbacks.c.status,
            _callbacks.c.error_code,
            _callbacks.c.error_message,
            _callbacks.c.changed_at,
            _callbacks.c.attempts,
        )
    )


def claim_due(session: Session, settings: Settings, now: datetime) -> list[Due]:
    """Lease up to SMSD_STATUS_CALLBACK_BATCH due callbacks (see the module) with their bodies."""
    # Longer than the longest a run can spend on them: every POST, its name's resolution
    # included, ends within SMSD_STATUS_CALLBACK_TIMEOUT, CONCURRENCY at a time. So no other
    # deliverer takes a callback again while the first may still be POSTing it (which could
    # put a message's changes out of order at the receiver).
    waves = -(-settings.status_callback_batch // CONCURRENCY)
    lease = now + settings.status_callback_timeout * (waves + 1) + timedelta(seconds=30)
    taken = session.execute(_due_statement(now, lease, settings.status_callback_batch)).all()
    if not taken:
        return []
    sids = {row.message_sid for row in taken}
    ordinal = {
        id_: n
        for id_, n in session.execute(
            select(
                StatusCallback.id,
                func.row_number().over(
                    partition_by=StatusCallback.message_sid, order_by=StatusCallback.id
                ),
            ).where(StatusCallback.message_sid.in_(sids))
        )
    }
    about = {
        row.sid: row
        for row in session.execute(
            select(
                Message.sid,
                Message.campaign_id,
                Message.batch_id,
                Message.to_number,
                Message.created_at,
                Account.tenant_id,
            )
            .join(Account, Account.id == Message.account_id)
            .where(Message.sid.in_(sids))
        )
    }
    due = []
    for row in sorted(taken, key=lambda r: r.id):
        message = about.get(row.message_sid)
        if message is None:
            continue  # deleted since (the cascade takes the callback with it)
        due.append(
            Due(
                id=row.id,
                account_id=row.account_id,
                url=row.url,
                attempt=row.attempts,
                changed_at=row.changed_at,
                lease=lease,
                payload={
                    "eventId": StatusCallback.event_id(row.message_sid, ordinal[row.id]),
                    "messageSid": row.message_sid,
                    "accountId": message.tenant_id,
                    "campaignId": message.campaign_id,
                    "batchId": message.batch_id,
                    "to": message.to_number,
                    "status": row.status,
                    "errorCode": row.error_code,
                    "errorMessage": row.error_message,
                    "createdAt": _rfc3339(message.created_at),
                    "changedAt": _rfc3339(row.changed_at),
                    "attempt": row.attempts,
                },
            )
        )
    return due


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Poster:
    """POSTs callbacks to addresses it has checked, on one event loop per run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowed: tuple[IPNetwork, ...] = allowed_networks(
            settings.status_callback_allowed_networks
        )

    def post_all(self, due: list[Due], secrets: dict[int, list[str]]) -> list[Attempt]:
        return asyncio.run(self._post_all(due, secrets))

    async def _post_all(self, due: list[Due], secrets: dict[int, list[str]]) -> list[Attempt]:
        limit = asyncio.Semaphore(CONCURRENCY)
        timeout = self.settings.status_callback_timeout.total_seconds()
        async with httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            # No proxy from the environment: the POST must go to the address judged here.
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        ) as client:

            async def one(callback: Due) -> Attempt:
                async with limit:
                    return await self._post(client, callback, secrets[callback.account_id])

            return list(await asyncio.gather(*(one(callback) for callback in due)))

    async def _post(self, client: httpx.AsyncClient, due: Due, secrets: list[str]) -> Attempt:
        """One POST, never raising: whatever happens is the attempt's outcome. The name's
        resolution and the whole exchange end within SMSD_STATUS_CALLBACK_TIMEOUT (httpx's
        own timeouts bound each read, so a receiver trickling its answer could last forever)."""
        at = utcnow()
        started = time.perf_counter()

        def ended(status: int | None, error: str | None, *, refused: bool = False) -> Attempt:
            elapsed = round((time.perf_counter() - started) * 1000)
            return Attempt(due, at, status, error, elapsed, refused)

        try:
            async with asyncio.timeout(self.settings.status_callback_timeout.total_seconds()):
                return await self._exchange(client, due, secrets, ended)
        except TimeoutError:
            return ended(None, "timeout")
        except _Refused as refused:
            # The account sees no more than that: the reason (and the address) would tell it
            # what the operator's network holds, one name at a time.
            log.warning(
                "status_callback.address_refused",
                eventId=due.payload["eventId"],
                url=shown_url(due.url),
                reason=str(refused),
            )
            return ended(None, NO_ALLOWED_ADDRESS, refused=True)
        except OSError as exc:
            log.info("status_callback.unresolved", url=shown_url(due.url), error=str(exc))
            return ended(None, NO_ALLOWED_ADDRESS)
        except httpx.ConnectError:
            return ended(None, "connection failed")
        except Exception as exc:  # anything else is this attempt's failure, never the run's
            return ended(None, f"failed: {type(exc).__name__}")

    async def _exchange(
        self,
        client: httpx.AsyncClient,
        due: Due,
        secrets: list[str],
        ended: Callable[[int | None, str | None], Attempt],
    ) -> Attempt:
        parts = parse_callback_url(due.url)
        if parts is None or parts.hostname is None:
            raise _Refused("not an absolute http or https URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await self._address(parts.hostname, port)
        body = json.dumps(due.payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: due.payload["eventId"],
            SIGNATURE_HEADER: signature_header(secrets, timestamp, body),
            # The name the caller gave, although the connection goes to the checked address.
            "Host": parts.netloc.rpartition("@")[2],
        }
        url = httpx.URL(due.url).copy_with(host=str(address), port=port)
        # TLS: the certificate is checked against the name, not the address.
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        async with client.stream(
            "POST", url, content=body, headers=headers, extensions=extensions
        ) as response:
            # The answer's body is not read: a receiver cannot make us download anything.
            return ended(response.status_code, None)

    async def _address(self, host: str, port: int) -> IPAddress:
        """The address to POST to: every address the name has must be allowed."""
        literal = literal_address(host)
        if literal is not None:
            candidates: list[IPAddress] = [literal]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            candidates = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not candidates:
            raise OSError("no address")
        for candidate in candidates:
            reason = refused_address(candidate, self.allowed)
            if reason is not None:
                raise _Refused(f"{candidate} is {reason}")
        return candidates[0]


class _Refused(Exception):
    """The callback's address is one the operator does not allow."""


def _backoff(settings: Settings, attempt: int) -> timedelta:
    """The delay after failed attempt `attempt` (1, 2, ...): doubling, capped, ±10 %."""
    base = settings.status_callback_backoff_base.total_seconds()
    capped = min(
        base * 2 ** min(attempt - 1, 30), settings.status_callback_backoff_max.total_seconds()
    )
    return timedelta(seconds=capped * random.uniform(0.9, 1.1))  # jitter, not a secret


_SETTLE = (
    update(_callbacks)
    .where(_callbacks.c.id == bindparam("id_"), _callbacks.c.leased_until == bindparam("lease"))
    .values(
        leased_until=None,
        outcome=bindparam("outcome"),
        done_at=bindparam("done_at"),
        next_attempt_at=bindparam("next_at"),
    )
)


def record(
    session: Session, attempts: list[Attempt], settings: Settings, now: datetime
) -> Counter[str]:
    """Each attempt as it went, and each callback settled (see the module); the outcomes."""
    outcomes: Counter[str] = Counter()
    if not attempts:
        return outcomes
    session.execute(
        insert(_attempts),
        [
            {
                "callback_id": a.due.id,
                "attempted_at": a.at,
                "response_status": a.response_status,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in attempts
        ],
    )
    settled = []
    for attempt in attempts:
        due = attempt.due
        if attempt.delivered:
            outcome: str | None = DELIVERED
        else:
            # A refused address is retried like any failure: giving up at once would tell the
            # account which of its names point inside (the operator sees it in the log).
            next_at = now + _backoff(settings, due.attempt)
            outcome = (
                GIVEN_UP if next_at > due.changed_at + settings.status_callback_retry_for else None
            )
        outcomes[outcome or (REFUSED if attempt.refused else RETRYING)] += 1
        if outcome == GIVEN_UP:
            log.warning(
                "status_callback.given_up",
                eventId=due.payload["eventId"],
                url=shown_url(due.url),
                attempts=due.attempt,
                error=attempt.error,
                responseStatus=attempt.response_status,
            )
        settled.append(
            {
                "id_": due.id,
                "lease": due.lease,
                "outcome": outcome,
                "done_at": now if outcome else None,
                "next_at": now if outcome else next_at,
            }
        )
    session.execute(_SETTLE, settled)
    return outcomes


class StatusCallbackDeliverer:
    """One process's deliverer: `run` delivers what is due, a batch at a time."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.poster = Poster(settings)
        self._running = threading.Lock()

    def run(self, budget: timedelta | None = None) -> Counter[str]:
        """Deliver due callbacks until none is left or `budget` (default: five intervals) is
        spent; the outcomes. Nothing when this process is already running it: beat comes
        every interval however long a run takes, and the runs must not pile up on threads."""
        if not self._running.acquire(blocking=False):
            return Counter()
        try:
            return self._run(budget or self.settings.status_callback_interval * 5)
        finally:
            self._running.release()

    def _run(self, budget: timedelta) -> Counter[str]:
        deadline = time.monotonic() + budget.total_seconds()
        outcomes: Counter[str] = Counter()
        while True:
            with self.db.transaction() as session:
                now = utcnow()
                due = claim_due(session, self.settings, now)
                secrets = (
                    signing_secrets(
                        session,
                        {d.account_id for d in due},
                        now,
                        self.settings.webhook_secret_overlap,
                    )
                    if due
                    else {}
                )
            if not due:
                return outcomes
            attempts = self.poster.post_all(due, secrets)
            with self.db.transaction() as session:
                outcomes += record(session, attempts, self.settings, utcnow())
            # Again at once, not at the next interval: what this batch delivered lets each of
            # its messages' next changes go (a message's changes come in bursts: sending, sent
            # and delivered within a second).
            if time.monotonic() > deadline:
                return outcomes


def pending_callbacks(session: Session, now: datetime) -> tuple[int, float]:
    """How many callbacks are not done yet, and the age in seconds of the oldest (0: none)."""
    count, oldest = session.execute(
        select(func.count(), func.min(_callbacks.c.changed_at)).where(
            _callbacks.c.done_at.is_(None)
        )
    ).one()
    return int(count), (now - oldest).total_seconds() if oldest is not None else 0.0
