"""Engines and sessions. The request or the task owns the transaction; services never commit."""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.core.config_cache import ConfigCache
from shared.core.settings import Settings

T = TypeVar("T")


def normalise_database_url(url: str) -> str:
    """Let operators write plain `postgresql://`; we always talk to PostgreSQL through psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _whole_seconds(value: timedelta) -> int:
    # libpq counts whole seconds.
    return max(1, math.ceil(value.total_seconds()))


def _milliseconds(value: timedelta) -> int:
    return max(0, round(value.total_seconds() * 1000))


def postgres_connect_args(
    settings: Settings, query: Mapping[str, Any], *, server_timeouts: bool
) -> dict[str, Any]:
    """libpq connection parameters that keep a stalled PostgreSQL from hanging its callers.

    - connect_timeout: a server that does not finish the handshake (psycopg waits at least 2 s).
    - keepalives and tcp_user_timeout: a dead host or a network partition. An idle connection is
      probed after keepalives_idle and dropped after keepalives_count unanswered probes; one with
      unacknowledged data in flight is dropped after tcp_user_timeout.
    - with `server_timeouts`, the server ends a statement, a lock wait or a transaction left
      idle after SMSD_DATABASE_STATEMENT_TIMEOUT / LOCK_TIMEOUT / IDLE_IN_TRANSACTION_TIMEOUT
      (sent as startup `options`: no extra round trip per connection).

    None of these catches a *frozen* server process (SIGSTOP, a hung VM with a live kernel):
    its kernel still ACKs every packet and answers keepalives, and a stopped backend cannot
    enforce its own statement_timeout. The API's per-accept deadline (SMSD_API_ACCEPT_DEADLINE,
    api/dependencies.py) is what answers callers then; the abandoned thread ends when the server
    answers again or the TCP timeouts fire. A parameter in the URL's query wins over ours."""
    wanted: dict[str, Any] = {
        "connect_timeout": _whole_seconds(settings.database_connect_timeout),
        "keepalives": 1,
        "keepalives_idle": _whole_seconds(settings.database_keepalives_idle),
        "keepalives_interval": _whole_seconds(settings.database_keepalives_interval),
        "keepalives_count": max(1, settings.database_keepalives_count),
        "tcp_user_timeout": _milliseconds(settings.database_tcp_user_timeout),
    }
    args = {name: value for name, value in wanted.items() if name not in query}
    if server_timeouts:
        gucs = {
            "statement_timeout": _milliseconds(settings.database_statement_timeout),
            "lock_timeout": _milliseconds(settings.database_lock_timeout),
            "idle_in_transaction_session_timeout": _milliseconds(
                settings.database_idle_in_transaction_timeout
            ),
        }
        options = " ".join(f"-c {name}={value}" for name, value in gucs.items())
        # The URL's own options come last, so that its `-c` settings win.
        own = query.get("options")
        if own:
            options = f"{options} {own if isinstance(own, str) else ' '.join(own)}"
        args["options"] = options
    return args


def create_db_engine(
    settings: Settings, *, pool_timeout: timedelta | None = None, server_timeouts: bool = False
) -> Engine:
    """An engine for the configured database, with SQLite tuned for several local processes.

    A database that is down or does not answer fails within seconds (connect_timeout), and a
    caller waits at most `pool_timeout` (default SMSD_DATABASE_POOL_TIMEOUT) for a pooled
    connection, so callers can answer "unavailable" instead of hanging. `server_timeouts`
    (the API's and workers' engines, through Database; not migrations, whose DDL may rightly
    take long) adds PostgreSQL's statement, lock and idle-in-transaction timeouts."""
    url = make_url(normalise_database_url(settings.database_url))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args = postgres_connect_args(settings, url.query, server_timeouts=server_timeouts)
    engine = create_engine(url, connect_args=connect_args, **_pool(settings, pool_timeout))
    if url.get_backend_name() == "postgresql":
        event.listen(engine, "handle_error", _drop_timed_out_connection)
        _one_statement_inserts(engine)
    return engine


def _one_statement_inserts(engine: Engine) -> None:
    """Many rows' INSERT (no RETURNING) as one multi-row statement, as SQLAlchemy already does
    with RETURNING and for psycopg2: psycopg 3 would run an executemany in pipeline mode,
    which cost the API 13% of its time while it applied callbacks (py-spy, `make bench`)."""
    engine.dialect.use_insertmanyvalues_wo_returning = True


def _pool(settings: Settings, pool_timeout: timedelta | None) -> dict[str, Any]:
    """The pool both engines use. A ping on checkout (a round trip): a connection the server
    dropped meanwhile (a restart, an administrator's terminate) is replaced, never answered
    503 for."""
    return dict(
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_timeout=(pool_timeout or settings.database_pool_timeout).total_seconds(),
        pool_pre_ping=True,
        pool_recycle=1800,
    )


# SQLSTATEs after which a connection is not trusted back into the pool: a statement cancelled
# (statement_timeout, or a cancel request), a lock wait given up, the server ending an idle
# transaction or the session (admin shutdown, crash), a connection failure.
_DROP_SQLSTATES = frozenset({"57014", "55P03", "25P03", "57P01", "57P02", "57P03"})


def _drop_timed_out_connection(context: ExceptionContext) -> None:
    """Invalidate (close, never pool again) a connection whose statement timed out or was cut.

    A real disconnect already invalidates the whole pool (SQLAlchemy's default: every pooled
    connection is stale after a server restart); a timed-out statement only drops its own
    connection, so one slow query does not reconnect everybody."""
    if context.is_disconnect:
        return
    orig = context.original_exception
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _DROP_SQLSTATES or (sqlstate or "").startswith("08"):
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False


class Abandoned(Exception):
    """The caller stopped waiting for this transaction: it was rolled back, not committed."""


def _forget_generation(session: Session, transaction: Any) -> None:
    # The config generation read belongs to one transaction: the next one reads its own.
    session.info.pop("config_generation", None)
    if transaction.parent is None:
        session.info.pop("connections", None)


def _note_connection(session: Session, _transaction: Any, connection: Connection) -> None:
    # The connections a transaction holds, so an abandoned one can be dropped (transaction()).
    session.info.setdefault("connections", []).append(connection)


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
        self.engine = create_db_engine(settings, pool_timeout=pool_timeout, server_timeouts=True)
        # Each session finds the process's lookup cache here (shared/core/config_cache.py).
        self.config_cache = ConfigCache(settings.config_cache_ttl.total_seconds())
        self.sessions = sessionmaker(
            self.engine, expire_on_commit=False, info={"config_cache": self.config_cache}
        )
        event.listen(self.sessions, "after_transaction_end", _forget_generation)
        event.listen(self.sessions, "after_begin", _note_connection)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self, abandoned: threading.Event | None = None) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error.

        `abandoned` is set by a caller that stopped waiting (an API deadline): work that
        finishes after that is rolled back, not committed, and its connection is closed
        rather than pooled. Only a COMMIT already in flight when the caller gave up may still
        land (the caller cannot know: it retries with the same Idempotency-Key)."""
        with self.sessions() as session, session.begin():
            yield session
            if abandoned is not None and abandoned.is_set():
                for connection in session.info.pop("connections", ()):
                    connection.invalidate()
                raise Abandoned()

    def ping(self) -> None:
        """A round trip through the pool (connect_timeout and pool_timeout bound it); raises
        when the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


class AcceptDeadlineExceeded(PoolTimeout):
    """The database did not finish an accept within SMSD_API_ACCEPT_DEADLINE: the caller is
    answered 503 like any other database outage (api/errors.py), and the work is abandoned."""


class AsyncDatabase:
    """The API's engine on the event loop: psycopg's async API (aiosqlite for the embedded
    SQLite default), with the same timeouts as `Database`. Work runs as the same synchronous
    SQLAlchemy code, through `AsyncConnection.run_sync`: on the event loop, its I/O awaited,
    no thread per request."""

    def __init__(
        self,
        settings: Settings,
        config_cache: ConfigCache,
        *,
        pool_timeout: timedelta | None = None,
    ) -> None:
        self.engine = create_async_db_engine(settings, pool_timeout=pool_timeout)
        self.config_cache = config_cache

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        """One transaction on the event loop, committed when the block ends without error and
        rolled back (its connection closed) when it raises."""
        async with self.engine.connect() as connection:
            await connection.begin()
            yield AsyncTransaction(connection, self.config_cache)
            await connection.commit()

    async def dispose(self) -> None:
        await self.engine.dispose()


class AsyncTransaction:
    """Runs synchronous SQLAlchemy work inside an `AsyncDatabase` transaction."""

    def __init__(self, connection: AsyncConnection, config_cache: ConfigCache) -> None:
        self._connection = connection
        self._config_cache = config_cache

    async def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` on this transaction's connection, its I/O awaited on the loop."""
        return await self._connection.run_sync(self._in_session, work)

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """psycopg's own `AsyncConnection` under this transaction (PostgreSQL only), for the
        hottest statements: no SQLAlchemy in between, and several statements pipelined into one
        round trip. A driver error closes the connection (it is never pooled again: nothing
        here knows what state it was left in) and is raised as SQLAlchemy's DBAPIError, which
        the edges answer as they answer any database error."""
        fairy = await self._connection.get_raw_connection()
        try:
            yield fairy.driver_connection
        except psycopg.Error as exc:
            await self._connection.invalidate()
            raise DBAPIError.instance(
                None, None, exc, psycopg.Error, connection_invalidated=True
            ) from exc

    def _in_session(self, connection: Connection, work: Callable[[Session], T]) -> T:
        # A session joining the transaction (begun before it, so closing the session leaves
        # the transaction alone): it reads the config generation once (config_cache.py) and
        # flushes what the ORM added before we commit.
        with Session(
            bind=connection,
            expire_on_commit=False,
            info={"config_cache": self._config_cache},
        ) as session:
            result = work(session)
            session.flush()
            return result


def async_database_url(url: str) -> URL:
    """The URL of the async driver: psycopg speaks both; SQLite goes through aiosqlite."""
    parsed = make_url(normalise_database_url(url))
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    return parsed


def create_async_db_engine(
    settings: Settings, *, pool_timeout: timedelta | None = None
) -> AsyncEngine:
    """`create_db_engine`'s twin for the event loop, with the same timeouts and SQLite tuning."""
    url = async_database_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(
        url,
        connect_args=postgres_connect_args(settings, url.query, server_timeouts=True),
        **_pool(settings, pool_timeout),
    )
    event.listen(engine.sync_engine, "handle_error", _drop_timed_out_connection)
    _one_statement_inserts(engine.sync_engine)
    return engine
