"""Phone numbers: everything we store or send is E.164."""

from __future__ import annotations

import functools
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import phonenumbers
import structlog

log = structlog.get_logger(__name__)

# Parsing and validating a number costs tens of microseconds, more than the rest of an accept's
# checks together; the same callers and senders come back again and again.
_CACHED = 65_536


@functools.lru_cache(maxsize=_CACHED)
def to_e164(raw: str, default_region: str) -> str | None:
    """`+972 54 4696388` -> `+972544696388`; None when it is not a valid phone number."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@functools.lru_cache(maxsize=_CACHED)
def normalise_sender(raw: str, default_region: str) -> str:
    """A sender is a number (made E.164 when it parses) or an alphanumeric sender id (kept)."""
    stripped = raw.strip()
    if any(ch.isalpha() for ch in stripped):
        return stripped
    try:
        parsed = phonenumbers.parse(stripped, default_region)
    except phonenumbers.NumberParseException:
        return stripped
    # Short codes ("33669") are senders too: prefixing a country code would invent a number.
    if not stripped.startswith("+") and not phonenumbers.is_possible_number(parsed):
        return stripped
    # Long numbers are only formatted, not validated (test ranges fail strict validation);
    # the account's list of senders decides what is allowed.
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def to_e164_many(raws: list[str | None], default_region: str) -> list[str | None]:
    """`to_e164` of each (None for None): one call for a whole chunk of a bulk request, which a
    pool process can run (module level, so it pickles)."""
    return [to_e164(raw, default_region) if raw else None for raw in raws]


class NumberPool:
    """Validates bulk recipients' numbers in another process, a chunk ahead of the bulk
    request's thread (which renders, measures and stores), so the two run at once.

    Validating a number is the largest single cost of storing a bulk recipient (phonenumbers
    matches it against every number type of its region), and pure: it moves to another
    process without sharing anything. `processes` 0 checks in the calling thread. Whatever
    goes wrong with the pool (its process killed, the pool shut down, a process that cannot be
    started) costs that chunk a check in the calling thread, never the request: a broken pool
    is replaced, one that cannot be started is not tried again."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, raws: list[str | None], default_region: str) -> Checking:
        """Start checking `raws`; `result` gives the answer."""
        pool = self._executor() if raws else None
        if pool is not None:
            try:
                return Checking(pool.submit(to_e164_many, raws, default_region), pool)
            except BrokenProcessPool:
                self._drop(pool)
            except Exception:
                # Processes cannot be started here (a process limit, no /dev/shm): stop trying.
                log.warning("bulk.number_pool_unavailable", exc_info=True)
                self.processes = 0
                self._drop(pool)
        return Checking(_done(to_e164_many(raws, default_region)), None)

    def result(
        self, checking: Checking, raws: list[str | None], default_region: str
    ) -> list[str | None]:
        """The numbers `submit` started checking; checked here if the pool failed them."""
        try:
            return checking.future.result()
        except Exception as exc:  # broken, cancelled by a shutdown: this chunk is checked here
            if isinstance(exc, BrokenProcessPool) and checking.pool is not None:
                self._drop(checking.pool)
            return to_e164_many(raws, default_region)

    def _executor(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._closed or self.processes <= 0:
                return None
            if self._pool is None:
                # Spawned, never forked: the API process runs threads and an event loop that a
                # fork would copy mid-flight.
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        """Forget `pool` (if it is still the current one: another request may have replaced
        it already) and shut it down; what it was still running fails over to the callers."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False)

    def close(self) -> None:
        """No pool from now on; requests still running check their chunks themselves."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class Checking:
    """A chunk's numbers being checked, and by which pool (None: already done here)."""

    future: Future[list[str | None]]
    pool: ProcessPoolExecutor | None


def _done(value: list[str | None]) -> Future[list[str | None]]:
    future: Future[list[str | None]] = Future()
    future.set_result(value)
    return future
