"""A broker outage delays messages; it never loses one or turns a request into an error."""

from __future__ import annotations

from litestar.testing import TestClient
from sqlalchemy import select

from api.app import create_app
from shared.core.db import Database
from shared.core.models import Message
from shared.core.settings import Settings
from tests.support.api import issue_token
from tests.support.data import CALLER, TENANT, Demo, headers
from tests.support.services import free_port


def test_a_send_is_accepted_and_kept_unpublished_while_the_broker_is_down(
    migrated: Settings, db: Database, demo: Demo
) -> None:
    dead_broker = migrated.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(app=create_app(dead_broker)) as client:
        token = issue_token(client)
        response = client.post(
            f"/interact/version/3/account/{TENANT}/resources/campaign/sms/campaign1",
            headers=headers(),
            json={"callerId": CALLER, "jpToken": token},
        )
    assert response.status_code == 200, response.text
    sid = response.text.rsplit(" ", 1)[1]
    with db.transaction() as session:
        message = session.execute(select(Message).where(Message.sid == sid)).scalar_one()
    # Committed and waiting for the sweeper, which publishes rows without published_at.
    assert (message.status, message.published_at) == ("queued", None)
