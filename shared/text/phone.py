"""Phone numbers: everything we store or send is E.164."""

from __future__ import annotations

import functools
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import phonenumbers

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
    """Validates bulk recipients' numbers in other processes, so that a bulk request's own
    thread (which renders, measures and stores) and the number checks run on two cores.

    Validating a number is the largest single cost of storing a bulk recipient (phonenumbers
    matches it against every number type of its region: half of the thread's time), and pure:
    it parallelises without sharing anything. `processes` 0 checks in the calling thread. A
    pool that breaks (its process killed) is replaced, and the chunk checked in the caller."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, raws: list[str | None], default_region: str) -> Future[list[str | None]]:
        if self.processes <= 0 or not raws:
            return _done(to_e164_many(raws, default_region))
        try:
            return self._executor().submit(to_e164_many, raws, default_region)
        except BrokenProcessPool:
            self._replace()
            return _done(to_e164_many(raws, default_region))

    def result(
        self, future: Future[list[str | None]], raws: list[str | None], default_region: str
    ) -> list[str | None]:
        """The future's numbers; computed here if its process died meanwhile."""
        try:
            return future.result()
        except BrokenProcessPool:
            self._replace()
            return to_e164_many(raws, default_region)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # Spawned, never forked: the API process runs threads and an event loop that a
                # fork would copy mid-flight.
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def _replace(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._replace()


def _done(value: list[str | None]) -> Future[list[str | None]]:
    future: Future[list[str | None]] = Future()
    future.set_result(value)
    return future
