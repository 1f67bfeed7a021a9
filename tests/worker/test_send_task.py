"""The send task run in-process against the real database and broker, with a provider plugin
that fails the way a buggy adapter would (a fake provider, registered like any other)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar

import pytest
import redis
from sqlalchemy import update

from shared.accounts import provisioning
from shared.core.db import Database
from shared.core.models import Message, ProviderAccount, utcnow
from shared.core.settings import Settings
from shared.providers.interface import SendRequest, SendResult, register
from tests.support.data import TENANT, Demo
from tests.support.messages import accept_message, load_message
from worker import tasks


class ExplodingProvider:
    """An adapter with a bug: every send raises something no provider error type covers."""

    name: ClassVar[str] = "exploding"
    idempotent: ClassVar[bool] = False
    searchable: ClassVar[bool] = False

    def __init__(self, _credentials: Mapping[str, Any], _settings: Settings) -> None:
        pass

    def send(self, request: SendRequest) -> SendResult:
        raise RuntimeError("boom")

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        raise NotImplementedError  # not searchable

    def status_of(self, provider_message_id: str) -> str | None:
        return None

    def close(self) -> None:
        pass


register("exploding")(ExplodingProvider)

# The task is reached through its module: a task object at module level would be inspected by
# pytest's collection, which makes Celery read its settings before the fixtures set them.


@pytest.fixture
def exploding(demo: Demo, db: Database) -> None:
    with db.transaction() as session:
        session.execute(update(ProviderAccount).values(provider="exploding"))
        account = provisioning.get_account(session, TENANT)
        assert account.id == demo.account_id


def test_an_adapter_bug_is_retried_and_recorded_not_left_sending(
    exploding: None, db: Database, migrated: Settings, redis_url: str
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    tasks.send_message(sid)
    message = load_message(db, sid)
    assert (message.status, message.attempts) == ("queued", 1)
    assert (message.error_code, message.error_message) == ("error", "RuntimeError: boom")
    assert message.next_attempt_at is not None
    assert message.published_at is not None
    # The retry is on the broker (as a countdown task), not lost with the exception.
    assert redis.Redis.from_url(redis_url).llen(migrated.send_queue) == 1


def test_an_adapter_bug_ends_failed_once_attempts_are_exhausted(
    exploding: None, db: Database, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    for _ in range(migrated.max_send_attempts):
        tasks.send_message(sid)
    message = load_message(db, sid)
    assert (message.status, message.attempts, message.error_code) == (
        "failed",
        migrated.max_send_attempts,
        "error",
    )


def test_a_message_whose_workers_keep_dying_ends_failed_instead_of_looping(
    demo: Demo, db: Database, migrated: Settings
) -> None:
    sid = accept_message(db, migrated, utcnow(), with_token=False)
    with db.transaction() as session:
        session.execute(
            update(Message)
            .where(Message.sid == sid)
            .values(
                status="sending",
                attempts=migrated.max_send_attempts,
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
    tasks.send_message(sid)
    message = load_message(db, sid)
    assert (message.status, message.error_code) == ("failed", "attempts-exhausted")
