"""Engines and sessions. The request or the task owns the transaction; services never commit."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.directory import ConfigCache
from shared.settings import Settings


def normalise_database_url(url: str) -> str:
    """Let operators write plain `postgresql://`; we always talk to PostgreSQL through psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def create_db_engine(settings: Settings, *, pool_timeout: timedelta | None = None) -> Engine:
    """An engine for the configured database, with SQLite tuned for several local processes.

    A database that is down or does not answer fails within seconds (connect_timeout), and a
    caller waits at most `pool_timeout` (default SMSD_DATABASE_POOL_TIMEOUT) for a pooled
    connection, so callers can answer "unavailable" instead of hanging."""
    url = make_url(normalise_database_url(settings.database_url))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        # libpq counts whole seconds (psycopg never waits less than 2).
        connect_args["connect_timeout"] = max(
            1, math.ceil(settings.database_connect_timeout.total_seconds())
        )
    return create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_timeout=(pool_timeout or settings.database_pool_timeout).total_seconds(),
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
    )


def _forget_generation(session: Session, _transaction: Any) -> None:
    # The config generation read belongs to one transaction: the next one reads its own.
    session.info.pop("config_generation", None)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    # synchronous=FULL: a 200 promises the message survives a power cut, not just a crash.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    """One engine and session factory per process."""

    def __init__(self, settings: Settings, *, pool_timeout: timedelta | None = None) -> None:
        self.engine = create_db_engine(settings, pool_timeout=pool_timeout)
        # Each session finds the process's lookup cache here (shared/directory.py).
        self.config_cache = ConfigCache(settings.config_cache_ttl.total_seconds())
        self.sessions = sessionmaker(
            self.engine, expire_on_commit=False, info={"config_cache": self.config_cache}
        )
        event.listen(self.sessions, "after_transaction_end", _forget_generation)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
