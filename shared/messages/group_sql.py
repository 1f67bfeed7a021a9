"""A group accept on PostgreSQL in two round trips: the same checks as `accept_group` on the
session, with its reads and its writes each sent as one query on psycopg's own connection.

1. The group's reads in one round trip: the config generation (is the cache current?), the
   tokens it names and the messages holding its Idempotency-Keys.
2. `accept_group` itself, with the configuration from the cache and those reads (no I/O).
3. The writes in one round trip: the publisher's marks, the new messages (one INSERT of a JSON
   array per kind) and, unless a keyed insert must be checked first, the COMMIT.

Whatever this path cannot settle from the cache and those reads raises NotCached *before*
anything is written (a lookup the cache does not hold, the config changed since it was
read, a campaign with short links): the caller then runs `accept_group` on a session in the
same transaction, which reads what it needs as it goes. A keyed insert that lost its key to
a concurrent twin raises KeyRaceLost after writing: the caller rolls back and retries that
way, where the twin's message is found."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from shared.calls.queries import TOKENS_NAMED_SQL
from shared.calls.tokens import TokenRef
from shared.core.config_cache import READ_GENERATION_SQL, ConfigCache, NotCached
from shared.core.db import Abandoned, AsyncTransaction
from shared.core.settings import Settings
from shared.messages.accept import (
    AcceptedMessage,
    Outcome,
    SendSmsCommand,
    TokenKey,
    accept_group,
    group_reads,
)
from shared.messages.queries import (
    INSERT_KEYED_MESSAGES_SQL,
    INSERT_MESSAGES_SQL,
    MARK_PUBLISHED_SQL,
    MESSAGES_BY_IDEMPOTENCY_KEYS_SQL,
    EarlierMessage,
    messages_json,
)

Marks = list[tuple[list[str], datetime]]


class _Statements:
    """Several statements sent as one query (client-side parameters, PostgreSQL's simple
    protocol): one round trip, and no per-statement wait on the event loop. psycopg's
    pipeline mode would do the same with server-side parameters, but its async loop spins
    the CPU while it waits (a fifth of an accept's, measured)."""

    def __init__(self, *first: str) -> None:
        self._sql: list[str] = list(first)
        self.params: list[Any] = []

    def add(self, sql: str, *params: Any) -> None:
        self._sql.append(sql)
        self.params.extend(params)

    @property
    def sql(self) -> str:
        return "; ".join(self._sql)


class KeyRaceLost(Exception):
    """A keyed message was not written: another transaction took its Idempotency-Key since
    the group looked. Roll back and accept the group again on the session."""


class _Planned:
    """`GroupIO` from the reads done beforehand; keeps the writes for the caller."""

    def __init__(
        self,
        earlier: Mapping[tuple[int, str], EarlierMessage],
        tokens: Mapping[TokenKey, TokenRef],
        read_keys: set[tuple[int, str]],
        read_tokens: set[TokenKey],
    ) -> None:
        self._earlier = earlier
        self._tokens = tokens
        self._read_keys = read_keys
        self._read_tokens = read_tokens
        self.plain: list[dict[str, Any]] = []
        self.keyed: list[dict[str, Any]] = []

    def earlier(self, keys: Sequence[tuple[int, str]]) -> Mapping[tuple[int, str], EarlierMessage]:
        if not self._read_keys.issuperset(keys):
            raise NotCached("an Idempotency-Key not read beforehand")
        return self._earlier

    def tokens(self, wanted: Sequence[TokenKey]) -> Mapping[TokenKey, TokenRef]:
        if not self._read_tokens.issuperset(wanted):
            raise NotCached("a token not read beforehand")
        return self._tokens

    def insert(self, plain: list[dict[str, Any]], keyed: list[dict[str, Any]]) -> set[str]:
        # Written by the caller; a keyed row that then fails to take its key is KeyRaceLost.
        self.plain, self.keyed = plain, keyed
        return {row["sid"] for row in keyed}

    def lost_key_race(self, key: tuple[int, str]) -> EarlierMessage | None:
        raise AssertionError("insert() reports every keyed row as written")


async def accept_group_on_postgres(
    transaction: AsyncTransaction,
    cache: ConfigCache,
    commands: Sequence[SendSmsCommand],
    settings: Settings,
    now: datetime,
    marks: Marks,
    still_wanted: Callable[[], list[bool]],
) -> list[Outcome]:
    """`accept_group` for `commands`, committed (see the module's docstring). `still_wanted()`
    is asked just before the writes leave: a request that stopped waiting meanwhile has no
    message written (its outcome becomes Abandoned)."""
    generation = cache.generation
    if generation is None:
        raise NotCached("nothing cached yet")
    session = cache.cache_only_session(generation)
    keys, token_keys = group_reads(session, commands, now)
    reads = _Statements(READ_GENERATION_SQL)
    if token_keys:
        reads.add(TOKENS_NAMED_SQL, sorted({token for _, _, token in token_keys}))
    if keys:
        reads.add(
            MESSAGES_BY_IDEMPOTENCY_KEYS_SQL,
            [account for account, _ in keys],
            [key for _, key in keys],
        )
    async with transaction.driver() as connection:
        cursor = psycopg.AsyncClientCursor(connection)
        await cursor.execute(reads.sql, reads.params)
        current = await cursor.fetchone()
        if current is None or current[0] != generation:
            raise NotCached("the configuration changed since it was cached")
        wanted_tokens = set(token_keys)
        tokens: dict[TokenKey, TokenRef] = {}
        if token_keys:
            cursor.nextset()
            for id_, token, expires_at, account, environment in await cursor.fetchall():
                if (account, environment, token) in wanted_tokens:
                    tokens[(account, environment, token)] = TokenRef(id_, token, expires_at)
        earlier: dict[tuple[int, str], EarlierMessage] = {}
        if keys:
            cursor.nextset()
            for account, key, sid, campaign_id, fingerprint in await cursor.fetchall():
                earlier[(account, key)] = EarlierMessage(sid, campaign_id, fingerprint)
        io = _Planned(earlier, tokens, set(keys), wanted_tokens)
        outcomes = accept_group(session, commands, settings, now, io)

        # Asked as the writes leave: a request whose deadline passes after this is a COMMIT
        # in flight (shared/messages/group_commit.py), as on the session path.
        dropped = {
            outcome.sid
            for outcome, wanted in zip(outcomes, still_wanted(), strict=True)
            if not wanted and isinstance(outcome, AcceptedMessage) and not outcome.replayed
        }
        plain = [row for row in io.plain if row["sid"] not in dropped]
        keyed = [row for row in io.keyed if row["sid"] not in dropped]
        writes = _Statements()
        for sids, started in marks:
            writes.add(MARK_PUBLISHED_SQL, now, sids, started, started)
        if plain:
            writes.add(INSERT_MESSAGES_SQL, messages_json(plain))
        if keyed:
            # Checked before COMMIT: a key a concurrent twin took means KeyRaceLost.
            writes.add(INSERT_KEYED_MESSAGES_SQL, messages_json(keyed))
        else:
            writes.add("COMMIT")
        await cursor.execute(writes.sql, writes.params)
        if keyed:
            while cursor.nextset():
                pass  # to the last result: the keyed insert's
            if len(await cursor.fetchall()) < len(keyed):
                raise KeyRaceLost()
            await connection.commit()
    return [
        Abandoned() if isinstance(outcome, AcceptedMessage) and outcome.sid in dropped else outcome
        for outcome in outcomes
    ]
