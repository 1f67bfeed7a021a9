"""Helpers shared by the API specification tests (requests, and what they left behind)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import httpx
import redis
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import select

from shared.accounts import access, provisioning
from shared.core.db import Database
from shared.core.models import DeflectedCall, Message, ProviderAccount
from shared.messages.outbox import Publisher
from tests.support.data import CALLER, OTHER_KEY, OTHER_TENANT, TENANT, headers

V3 = f"/interact/version/3/account/{TENANT}/resources"
OTHER_V3 = f"/interact/version/3/account/{OTHER_TENANT}/resources"
SEND_QUEUE = "sms.send"  # the Redis list Celery's send queue lives in

CAMPAIGN_TEXT = "Please click here <link>"
CAMPAIGN_LINK = "https://flows.example.com/start?lang=en"

UNAUTHORIZED_BODY = {
    "code": "0x7000000",
    "message": "Request is unauthorized, missing or wrong credentials",
    "moreInfoUrl": "http://support.uniphore.com",
}
PROVIDER_NOT_DEFINED = (
    "Your Telephony provider is not defined, please contact Uniphore Support "
    "and read the following +link+"
)


def send_sms(
    client: TestClient[Litestar],
    body: dict[str, Any] | None = None,
    *,
    campaign: str = "campaign1",
    request_headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    """POST the seed's Send SMS v3 request (JSON `body`, or raw `content`)."""
    url = f"{V3}/campaign/sms/{campaign}"
    sent_headers = headers() if request_headers is None else request_headers
    if content is not None:
        return client.post(
            url, headers={**sent_headers, "Content-Type": "application/json"}, content=content
        )
    return client.post(url, headers=sent_headers, json=body if body is not None else {})


def issue_token(
    client: TestClient[Litestar],
    caller: str = CALLER,
    environment: str | None = None,
    **body: object,
) -> str:
    """A jpToken for a call in `environment` (the account's default when None)."""
    extra = {"Environment-Name": environment} if environment else {}
    response = client.post(
        f"/interact/version/3/account/{TENANT}/resources/token",
        headers=headers(**extra),
        json={"callerId": caller, **body},
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def other_account_token(client: TestClient[Litestar], caller: str = CALLER) -> str:
    """A jpToken issued by the second account (87654321)."""
    response = client.post(
        f"{OTHER_V3}/token",
        headers=headers(OTHER_TENANT, OTHER_KEY),
        json={"callerId": caller},
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["jpToken"]
    return token


def queued_tasks(redis_url: str) -> int:
    """How many send tasks wait on the broker's `sms.send` list, once this process's API has
    published everything it answered 200 for."""
    Publisher.flush_all()
    broker = redis.Redis.from_url(redis_url)
    try:
        return broker.llen(SEND_QUEUE)
    finally:
        broker.close()


def queued_sends(redis_url: str, queue: str = SEND_QUEUE) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every task waiting on `queue` (the realtime lane's `sms.send`,
    unless told), oldest first (after the flush)."""
    Publisher.flush_all()
    broker = redis.Redis.from_url(redis_url)
    try:
        raw: list[bytes | str] = broker.lrange(queue, 0, -1)
    finally:
        broker.close()
    tasks = []
    # kombu pushes to the left and pops from the right: the oldest is last.
    for envelope in map(json.loads, reversed(raw)):
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        tasks.append((envelope["headers"]["task"], args))
    return tasks


def stored_messages(db: Database) -> list[Message]:
    with db.transaction() as session:
        return list(session.scalars(select(Message).order_by(Message.created_at)))


def stored_deflected_calls(db: Database) -> list[DeflectedCall]:
    with db.transaction() as session:
        return list(session.scalars(select(DeflectedCall)))


def assert_nothing_placed(db: Database, redis_url: str) -> None:
    """A refused request leaves no message row and no task behind."""
    assert stored_messages(db) == []
    assert queued_tasks(redis_url) == 0


def put_campaign(
    db: Database,
    campaign_id: str = "campaign1",
    *,
    environment: str | None = None,
    message_text: str = CAMPAIGN_TEXT,
    link_url: str | None = CAMPAIGN_LINK,
    active: bool = True,
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
) -> None:
    """Create or replace a campaign of the demo account (default environment unless named)."""
    with db.transaction() as session:
        account = provisioning.get_account(session, TENANT)
        env = access.resolve_environment(session, account, environment)
        provisioning.upsert_campaign(
            session,
            env,
            campaign_id,
            name="Deflection",
            message_text=message_text,
            link_url=link_url,
            active=active,
            valid_from=valid_from,
            valid_until=valid_until,
        )


def simulator_credentials(db: Database, tenant: str) -> tuple[str, str]:
    """(account id, signing secret) of the simulator account the tenant's settings were issued."""
    with db.transaction() as session:
        account = provisioning.get_account(session, tenant)
        credentials = session.scalars(
            select(ProviderAccount.credentials).where(
                ProviderAccount.account_id == account.id, ProviderAccount.provider == "simulator"
            )
        ).one()
        return str(credentials["account_id"]), str(credentials["signing_secret"])
