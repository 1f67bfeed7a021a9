"""A per-process cache of what every request looks up and almost nothing changes: the account
behind a key, its environments, campaigns and provider settings.

Without it an accept spends five of its six SELECTs (and most of its SQLAlchemy time) reading
these rows again. Staleness is not traded for that: the cache is only used when the request's
own transaction reads the same `config_generation` value the cached rows were read under.
PostgreSQL triggers write a fresh value in every transaction that changes those tables
(migration 0004), so a revoked key, a paused campaign or new provider settings take effect for
the very next request, in every process, with one cheap primary-key read per request.

Only rows that exist are cached: a wrong key or an unknown campaign is read every time, so
nobody can fill the cache by guessing. The embedded SQLite default does not cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from shared.core.models import ConfigGeneration

T = TypeVar("T")

# Under this the number of accounts, environments and campaigns a process sees in a TTL.
MAX_ENTRIES = 50_000
_UNREAD = object()
_READ_GENERATION = select(ConfigGeneration.generation).where(ConfigGeneration.id == 1)
# The same as plain SQL for psycopg's own connection (shared/messages/group_sql.py).
READ_GENERATION_SQL = "SELECT generation FROM config_generation WHERE id = 1"


# A session whose info holds this (and its `config_generation`) only reads the cache: it has
# no connection, and a lookup the cache cannot answer raises NotCached.
CACHE_ONLY = "config_cache_only"


class NotCached(Exception):
    """A cache-only lookup (`CACHE_ONLY`) the cache cannot answer: ask the database."""


class ConfigCache:
    """Rows keyed by what looked them up, valid for one config generation and at most `ttl` s."""

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._entries: dict[Hashable, tuple[float, object]] = {}

    def lookup(self, session: Session, key: Hashable, load: Callable[[], T]) -> T:
        """`load()`'s answer for `key`, from the cache when it was read under this request's
        config generation. ORM objects are detached before they are cached: read-only after."""
        if self.ttl <= 0:
            return load()
        generation = _generation(session)
        if generation is None:
            return load()
        now = time.monotonic()
        with self._lock:
            if session.info.get(CACHE_ONLY) and generation != self._generation:
                # Another request moved the cache on meanwhile: ask the database, never move
                # the cache back to what this one read.
                raise NotCached(key)
            if generation != self._generation:
                # Some transaction changed the cached tables (or this request's snapshot is
                # older than what we hold): start again under the generation it reads.
                self._entries.clear()
                self._generation = generation
            hit = self._entries.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]  # type: ignore[return-value]
        if session.info.get(CACHE_ONLY):
            raise NotCached(key)
        value = load()
        if value is None:  # nothing found: never cached, so guessing cannot fill the cache
            return value
        for row in value if isinstance(value, list | tuple) else (value,):
            state = inspect(row, raiseerr=False)
            if state is not None and state.session is session:
                session.expunge(row)
        with self._lock:
            # Read under this generation by this transaction, which saw it: safe to keep, as
            # long as no request has moved the cache on to another generation meanwhile.
            if self._generation == generation:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key] = (now + self.ttl, value)
        return value

    @property
    def generation(self) -> str | None:
        """The config generation the cached rows were read under (None: nothing cached)."""
        return self._generation if self.ttl > 0 else None

    def cache_only_session(self, generation: str) -> Session:
        """A session without a connection that answers lookups from this cache, as read under
        `generation`, or raises NotCached."""
        return Session(
            info={"config_cache": self, "config_generation": generation, CACHE_ONLY: True}
        )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation = None


def _generation(session: Session) -> str | None:
    """This transaction's config generation, read once per session; None: do not cache."""
    seen = session.info.get("config_generation", _UNREAD)
    if seen is _UNREAD:
        seen = (
            session.connection().execute(_READ_GENERATION).scalar()
            if session.get_bind().dialect.name == "postgresql"
            else None
        )
        session.info["config_generation"] = seen
    return seen if isinstance(seen, str) else None


def cached(session: Session, key: Hashable, load: Callable[[], T]) -> T:
    """Look `key` up in the session's cache (set by `Database`), or just load it."""
    cache = session.info.get("config_cache")
    if isinstance(cache, ConfigCache):
        return cache.lookup(session, key, load)
    return load()
