"""The ledger every fault test ends with: what the callers were told against what the
database and the provider (the simulator) hold.

- every 200 is a row;
- every row reaches a final status (or, with `allow_in_doubt`, the honest `in_doubt`);
- the provider received each messageSid at most once, and exactly once when the message ended
  `delivered` or `sent`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message, MessageStatus
from tests.support.processes import wait_until


def sid_of(message: dict[str, Any]) -> str | None:
    """Our messageSid as the simulator recorded it: the idempotency key (generic API),
    client-ref (Vonage) or the `messageSid` in the status callback URL (Twilio)."""
    if message.get("idempotencyKey"):
        return str(message["idempotencyKey"])
    if message.get("clientRef"):
        return str(message["clientRef"])
    callback = message.get("statusCallback") or ""
    found = parse_qs(urlsplit(callback).query).get("messageSid")
    return found[0] if found else None


@dataclass(frozen=True)
class Ledger:
    statuses: dict[str, str]
    received: Counter[str]

    def missing(self, accepted: Iterable[str]) -> list[str]:
        return [sid for sid in accepted if sid not in self.statuses]

    def unfinished(self, *, allow_in_doubt: bool = False) -> dict[str, str]:
        done = {status.value for status in MessageStatus if status.is_final}
        if allow_in_doubt:
            done.add("in_doubt")
        return {sid: status for sid, status in self.statuses.items() if status not in done}

    def twice(self) -> dict[str, int]:
        return {sid: count for sid, count in self.received.items() if count > 1}

    def delivered_but_never_received(self) -> list[str]:
        return [
            sid
            for sid, status in self.statuses.items()
            if status in ("delivered", "sent") and self.received[sid] == 0
        ]


def _statuses(db: Database) -> dict[str, str]:
    with db.transaction() as session:
        return {row.sid: row.status for row in session.execute(select(Message.sid, Message.status))}


def read_ledger(db: Database, simulator_url: str) -> Ledger:
    statuses = _statuses(db)
    messages = httpx.get(f"{simulator_url}/messages", timeout=120).json()
    received: Counter[str] = Counter(sid for m in messages if (sid := sid_of(m)) is not None)
    return Ledger(statuses, received)


def settle(
    db: Database,
    simulator_url: str,
    accepted: list[str],
    *,
    timeout: float,
    allow_in_doubt: bool = False,
) -> Ledger:
    """Wait until every row is final, then check the ledger's promises; return it."""

    def final() -> bool:
        # The database alone while waiting: the provider's list is read once, at the end.
        return not Ledger(_statuses(db), Counter()).unfinished(allow_in_doubt=allow_in_doubt)

    try:
        wait_until(final, timeout, "every message final")
    except AssertionError:
        ledger = read_ledger(db, simulator_url)
        raise AssertionError(
            f"not final: {ledger.unfinished(allow_in_doubt=allow_in_doubt)}; "
            f"received: {dict(ledger.received)}"
        ) from None
    ledger = read_ledger(db, simulator_url)
    assert ledger.missing(accepted) == [], "a 200 without a row"
    assert ledger.twice() == {}, "a messageSid the provider received more than once"
    assert ledger.delivered_but_never_received() == []
    return ledger
