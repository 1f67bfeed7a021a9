"""Bulk send: POST .../campaign/sms/{campaignId}/bulk (JSON or CSV), its progress and its
cancellation."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import func, select, text

from api.app import create_app
from api.bulk import JsonArray
from shared.accounts import access, provisioning
from shared.core.broker import bulk_queue
from shared.core.db import Database
from shared.core.errors import InvalidParameter
from shared.core.models import BulkBatch, InteractionToken, Message, ShortLink, utcnow
from shared.core.settings import Settings
from shared.messages.bulk import refresh_statistics
from tests.support.api import (
    OTHER_V3,
    UNAUTHORIZED_BODY,
    V3,
    other_account_token,
    queued_sends,
)
from tests.support.api import issue_token as issue_demo_token
from tests.support.data import CALLER_E164, OTHER_KEY, OTHER_TENANT, SENDER, Demo, headers
from tests.support.processes import wait_until

BULK = f"{V3}/campaign/sms/campaign1/bulk"
ESTIMATE = "SELECT reltuples FROM pg_class WHERE oid = 'messages'::regclass"
BULK_QUEUE = "sms.send.bulk"
NUMBERS = ["+972544696388", "+972544696389", "+972544696390", "+972544696391"]


def bulk(
    client: TestClient[Litestar],
    rows: Any = None,
    *,
    content: bytes | None = None,
    csv: bool = False,
    url: str = BULK,
    key: str | None = None,
) -> httpx.Response:
    kind = "text/csv" if csv else "application/json"
    body = content if content is not None else json.dumps(rows).encode()
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(url, headers=headers(**{"Content-Type": kind, **extra}), content=body)


def batch_url(batch_id: str, base: str = V3, campaign: str = "campaign1") -> str:
    return f"{base}/campaign/sms/{campaign}/bulk/{batch_id}"


def short_links_campaign(db: Database, demo: Demo, text: str, max_segments: int = 3) -> None:
    """Campaign `short` of the demo account: `text` with a link sent as a short link."""
    with db.transaction() as session:
        account = provisioning.get_account(session, demo.tenant)
        prod = access.resolve_environment(session, account, None)
        campaign = provisioning.upsert_campaign(
            session,
            prod,
            "short",
            name="x",
            message_text=text,
            link_url="https://flows.example.com/start",
        )
        campaign.shorten_links = True
        campaign.max_segments = max_segments


def stored(db: Database, batch_id: str | None = None) -> list[Message]:
    with db.transaction() as session:
        query = select(Message).order_by(Message.to_number)
        if batch_id is not None:
            query = query.where(Message.batch_id == batch_id)
        return list(session.scalars(query))


def test_json_rows_are_each_a_message_and_bad_rows_are_reported(
    client: TestClient[Litestar], db: Database, demo: Demo, redis_url: str
) -> None:
    token = issue_demo_token(client, NUMBERS[2])
    rows = [
        {"callerId": NUMBERS[0], "additionalParams": "var1=a"},
        {"callerId": "not a number"},
        {"callerId": NUMBERS[1], "from": SENDER},
        "a row that is not an object",
        {"callerId": NUMBERS[2], "jpToken": token},
        {"callerId": NUMBERS[3], "jpToken": "Nope123"},
        {"callerId": NUMBERS[3], "from": "+19999999999"},
        {"callerId": 972544696391},  # read as text, as Send SMS does: no + means US here
    ]

    response = bulk(client, rows)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["accepted"] == 3
    assert answer["campaignId"] == "campaign1"
    assert answer["rejected"] == [
        {"row": 2, "parameter": "callerId", "error": "missing or invalid parameter callerId"},
        {"row": 4, "parameter": "body", "error": "missing or invalid parameter body"},
        {"row": 6, "parameter": "jpToken", "error": "missing or invalid parameter jpToken"},
        {"row": 7, "parameter": "from", "error": "missing or invalid parameter from"},
        {"row": 8, "parameter": "callerId", "error": "missing or invalid parameter callerId"},
    ]
    batch_id = answer["batchId"]
    assert batch_id.startswith("BB")
    assert len(batch_id) == 34
    assert response.headers["location"] == batch_url(batch_id)
    messages = stored(db, batch_id)
    assert [m.to_number for m in messages] == NUMBERS[:3]
    assert len({m.sid for m in messages}) == 3
    assert all(m.sid.startswith("SM") and m.status == "queued" for m in messages)
    first = messages[0]
    assert first.body == "Please click here https://flows.example.com/start?lang=en&var1=a"
    assert messages[2].token_id is not None
    # Every message is on the bulk lane's queue, once, after the commit.
    published = [sid for _, args in queued_sends(redis_url, BULK_QUEUE) for sid in _sids(args)]
    assert sorted(published) == sorted(m.sid for m in messages)


def _sids(args: list[Any]) -> list[str]:
    _batch_id, sids = args  # sms.send_bulk: [batchId, sids]
    assert isinstance(sids, list)
    return sids


def test_each_bulk_message_is_looked_up_like_a_single_send(
    client: TestClient[Litestar], demo: Demo, db: Database
) -> None:
    answer = bulk(client, [{"callerId": NUMBERS[0]}]).json()
    [message] = stored(db, answer["batchId"])

    view = client.get(f"{V3}/messages/{message.sid}", headers=headers())

    assert view.status_code == 200, view.text
    assert view.json()["messageSid"] == message.sid
    assert view.json()["status"] == "queued"


def test_csv_with_a_header_row_is_read_like_json(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    content = (
        "\ufeffcallerId,additionalParams,extra\r\n"
        f'{NUMBERS[0]},"var1=a,b",ignored\r\n'
        "12,var1=c,\r\n"
        "\r\n"
        f"{NUMBERS[1]},,\r\n"
    ).encode()

    response = bulk(client, content=content, csv=True)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["accepted"] == 2
    assert answer["rejected"] == [
        {"row": 2, "parameter": "callerId", "error": "missing or invalid parameter callerId"}
    ]
    messages = stored(db, answer["batchId"])
    assert [m.to_number for m in messages] == NUMBERS[:2]
    assert messages[0].body.endswith("&var1=a%2Cb") or messages[0].body.endswith("var1=a,b")


def test_a_csv_without_a_caller_column_is_refused_whole(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    response = bulk(client, content=b"phone\n+972544696388\n", csv=True)

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter callerId"
    assert stored(db) == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"callerId": "+972544696388"}',
        b'[{"callerId": "+972544696388"}',
        b'[{"callerId": "+972544696388"},]',
        b'[{"callerId": "+972544696388"}] []',
        b"[\xff]",
        b"",
    ],
    ids=["object", "unterminated", "trailing comma", "two arrays", "not utf-8", "empty"],
)
def test_a_body_that_is_not_one_json_array_is_refused_whole(
    client: TestClient[Litestar], db: Database, demo: Demo, content: bytes
) -> None:
    response = bulk(client, content=content)

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter body"
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(BulkBatch)) == 0
    assert stored(db) == []


def test_rows_split_across_reads_are_decoded_whole(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    # Padded so that rows straddle the reader's 64 KiB pieces, strings and escapes included.
    rows = [
        {"callerId": f"+{972544000000 + i}", "additionalParams": f"n={i:040d}\u00e9"}
        for i in range(3000)
    ]

    answer = bulk(client, rows).json()

    assert answer["accepted"] == 3000, answer["rejected"][:3]
    numbers = {m.to_number for m in stored(db, answer["batchId"])}
    assert numbers == {f"+{972544000000 + i}" for i in range(3000)}


@pytest.fixture
def small_limits(migrated: Settings, db: Database) -> Iterator[TestClient[Litestar]]:
    settings = migrated.model_copy(update={"bulk_max_recipients": 3, "bulk_max_body_bytes": 4096})
    with TestClient(app=create_app(settings)) as client:
        yield client


def test_more_recipients_than_the_limit_is_413_and_stores_nothing(
    small_limits: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    response = bulk(small_limits, [{"callerId": n} for n in NUMBERS])

    assert response.status_code == 413
    assert response.text == "too many recipients: at most 3 in one request"
    assert stored(db) == []
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(BulkBatch)) == 0


def test_a_body_over_the_byte_limit_is_413(
    small_limits: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    response = bulk(small_limits, content=b"[" + b" " * 5000 + b"]")

    assert response.status_code == 413
    assert response.text == "request body too large: at most 4096 bytes"
    assert stored(db) == []


def test_the_request_is_refused_whole_with_the_single_sends_answers(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    rows = [{"callerId": NUMBERS[0]}]

    wrong_key = client.post(
        BULK, headers={**headers(key="0" * 24), "Content-Type": "application/json"}, json=rows
    )
    no_campaign = bulk(client, rows, url=f"{V3}/campaign/sms/nope/bulk")
    other_tenant = bulk(client, rows, url=f"{OTHER_V3}/campaign/sms/other-campaign/bulk")

    assert wrong_key.status_code == 401
    assert wrong_key.json() == UNAUTHORIZED_BODY
    assert no_campaign.status_code == 404
    assert no_campaign.text == "Campaign nope was not found"
    assert other_tenant.status_code == 401
    assert stored(db) == []


def test_an_expired_token_rejects_its_row_as_the_single_send_would(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    token = issue_demo_token(client, NUMBERS[0], lifetimeSeconds=1)
    with db.transaction() as session:
        row = session.scalars(select(InteractionToken).where(InteractionToken.token == token)).one()
        row.expires_at = row.issued_at - timedelta(seconds=1)

    answer = bulk(client, [{"callerId": NUMBERS[0], "jpToken": token}]).json()

    assert answer["accepted"] == 0
    assert answer["rejected"] == [{"row": 1, "parameter": "jpToken", "error": "Token expired"}]


def test_another_accounts_token_is_not_found_in_this_one(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    token = other_account_token(client)

    answer = bulk(client, [{"callerId": CALLER_E164, "jpToken": token}]).json()

    assert answer["rejected"] == [
        {"row": 1, "parameter": "jpToken", "error": "missing or invalid parameter jpToken"}
    ]


def test_a_retry_with_the_same_idempotency_key_gets_the_first_answer(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    rows = [{"callerId": NUMBERS[0]}, {"callerId": "x"}]

    first = bulk(client, rows, key="campaign-run-7")
    again = bulk(client, rows, key="campaign-run-7")
    changed = bulk(client, rows[:1], key="campaign-run-7")

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotency-replay"] == "true"
    assert "idempotency-replay" not in first.headers
    assert changed.status_code == 422
    assert len(stored(db)) == 1


def test_progress_counts_the_batch_and_cancel_withdraws_what_is_queued(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    answer = bulk(client, [{"callerId": n} for n in NUMBERS] + [{"callerId": "x"}]).json()
    batch_id = answer["batchId"]
    # One message a worker has already taken: cancelling leaves it alone.
    taken = stored(db, batch_id)[0].sid
    with db.transaction() as session:
        session.get_one(Message, taken).status = "sending"

    progress = client.get(batch_url(batch_id), headers=headers())
    cancelled = client.delete(batch_url(batch_id), headers=headers())
    after = client.get(batch_url(batch_id), headers=headers())

    assert progress.status_code == 200, progress.text
    assert progress.json() | {"createdAt": None} == {
        "batchId": batch_id,
        "campaignId": "campaign1",
        "createdAt": None,
        "cancelledAt": None,
        "accepted": 4,
        "rejected": 1,
        "queued": 4,
        "sent": 0,
        "delivered": 0,
        "failed": 0,
        "optedOut": 0,
        "expired": 0,
        "cancelled": 0,
    }
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled"] == 3
    assert cancelled.json()["queued"] == 1
    assert cancelled.json()["cancelledAt"] is not None
    assert after.json() == cancelled.json()
    statuses = {m.sid: m.status for m in stored(db, batch_id)}
    assert statuses.pop(taken) == "sending"
    assert set(statuses.values()) == {"cancelled"}
    lookup = client.get(f"{V3}/messages/{next(iter(statuses))}", headers=headers()).json()
    assert lookup["status"] == "cancelled"


def test_another_tenant_cannot_see_or_cancel_a_batch(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    batch_id = bulk(client, [{"callerId": NUMBERS[0]}]).json()["batchId"]
    theirs = headers(OTHER_TENANT, OTHER_KEY)

    seen = client.get(batch_url(batch_id, OTHER_V3), headers=theirs)
    withdrawn = client.delete(batch_url(batch_id, OTHER_V3), headers=theirs)
    crossed = client.get(batch_url(batch_id), headers=theirs)
    other_campaign = client.get(batch_url(batch_id, campaign="other-campaign"), headers=headers())

    assert seen.status_code == withdrawn.status_code == other_campaign.status_code == 404
    assert seen.text == f"Batch {batch_id} was not found"
    assert crossed.status_code == 401
    assert {m.status for m in stored(db, batch_id)} == {"queued"}


def test_an_unknown_batch_is_404(client: TestClient[Litestar], demo: Demo) -> None:
    response = client.get(batch_url("BB" + "0" * 32), headers=headers())

    assert response.status_code == 404
    assert response.text == f"Batch BB{'0' * 32} was not found"


ARRAY = (
    '\ufeff [ {"callerId": "+972544696388", "additionalParams": "a=\\"]\\\\u00e9},"},'
    ' 12345, -1.5e3, true, null, "x,]", [1, [2]], {"nested": {"n": 10}} ]  \n'
).encode()


@pytest.mark.parametrize("read_size", [1, 2, 3, 5, 7, 64])
def test_the_json_reader_reads_an_array_cut_anywhere(read_size: int) -> None:
    # Every value is decoded whole, however the body is cut into pieces: a number cut in two
    # ("12" of "12345") is never read as a shorter one, nor a string's escapes as its end.
    items = list(JsonArray(io.BytesIO(ARRAY), read_size).items())

    assert items == json.loads(ARRAY.decode("utf-8-sig"))


@pytest.mark.parametrize("read_size", [1, 4, 64])
@pytest.mark.parametrize(
    "body", [b"[1, 2", b"[1 2]", b"[1,]", b"[] 1", b'["\xff"]', b"{}", b"", b"[tru]"]
)
def test_the_json_reader_refuses_a_body_that_is_not_one_array(read_size: int, body: bytes) -> None:
    with pytest.raises(InvalidParameter) as refused:
        list(JsonArray(io.BytesIO(body), read_size).items())

    assert refused.value.parameter == "body"


def test_the_location_of_a_campaign_with_any_name_is_a_valid_header(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    with db.transaction() as session:
        account = provisioning.get_account(session, demo.tenant)
        prod = access.resolve_environment(session, account, None)
        provisioning.upsert_campaign(
            session, prod, "café promo", name="x", message_text="Hi", link_url=None
        )

    response = bulk(client, [{"callerId": NUMBERS[0]}], url=f"{V3}/campaign/sms/café promo/bulk")

    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert location.endswith(f"/campaign/sms/caf%C3%A9%20promo/bulk/{response.json()['batchId']}")
    assert client.get(location, headers=headers()).json()["accepted"] == 1


# What an independent review found (each answered 500, stored a batch twice or cancelled a
# message the provider may have)


@pytest.mark.parametrize(
    "content",
    [
        b"[" + b"[" * 3000 + b"]" * 3000 + b"]",
        b'[{"callerId": ' + b"9" * 5000 + b"}]",
    ],
    ids=["nested 3,000 deep", "a 5,000-digit number"],
)
def test_a_json_value_python_cannot_hold_is_the_bodys_400(
    client: TestClient[Litestar], db: Database, demo: Demo, content: bytes
) -> None:
    response = bulk(client, content=content)

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter body"
    assert stored(db) == []


def test_a_lone_surrogate_rejects_its_row_not_the_batch(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    content = (
        b'[{"callerId": "+972544696388", "additionalParams": "a=\\ud800"},'
        b' {"callerId": "+972544696389", "jpToken": "\\udfff"},'
        b' {"callerId": "+972544696390"}]'
    )

    response = bulk(client, content=content)

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 1
    assert [(r["row"], r["parameter"]) for r in response.json()["rejected"]] == [
        (1, "additionalParams"),
        (2, "jpToken"),
    ]


def test_a_csv_line_longer_than_a_row_is_refused_before_it_is_read(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    content = b"callerId\n" + b"," * 200_000 + b"\n"

    response = bulk(client, content=content, csv=True)

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter body"


def test_an_empty_csv_is_the_bodys_400(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    response = bulk(client, content=b"", csv=True)

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter body"


def test_a_chunked_body_over_the_byte_limit_is_413_while_it_is_read(
    small_limits: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"["
        for _ in range(100):
            yield b" " * 100
        yield b"]"

    response = small_limits.post(
        BULK, headers=headers(**{"Content-Type": "application/json"}), content=pieces()
    )

    assert response.status_code == 413
    assert response.text == "request body too large: at most 4096 bytes"


def test_chunks_written_before_the_recipient_limit_are_rolled_back(
    small_limits: TestClient[Litestar],
    db: Database,
    demo: Demo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shared.messages.bulk.CHUNK", 2)  # two rows are written before the 413

    response = bulk(small_limits, [{"callerId": n} for n in NUMBERS])

    assert response.status_code == 413
    assert stored(db) == []


def test_cancel_leaves_a_message_the_provider_may_have(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    batch_id = bulk(client, [{"callerId": n} for n in NUMBERS[:2]]).json()["batchId"]
    doubtful, plain = (m.sid for m in stored(db, batch_id))
    with db.transaction() as session:
        # Handed back to the queue in doubt: a later claim must look it up, not drop it.
        session.get_one(Message, doubtful).in_doubt_since = utcnow()

    cancelled = client.delete(batch_url(batch_id), headers=headers()).json()

    assert cancelled["cancelled"] == 1
    assert {m.sid: m.status for m in stored(db, batch_id)} == {
        doubtful: "queued",
        plain: "cancelled",
    }


@pytest.mark.parametrize("batch_id", ["BB%00x", "BB" + "0" * 31 + "%01"], ids=["NUL", "SOH"])
def test_a_batch_id_with_a_control_character_is_400(
    client: TestClient[Litestar], demo: Demo, batch_id: str
) -> None:
    response = client.get(batch_url(batch_id), headers=headers())

    assert response.status_code == 400
    assert response.text == "missing or invalid parameter batchId"


def test_a_campaign_id_no_database_holds_is_no_batch(
    client: TestClient[Litestar], demo: Demo
) -> None:
    batch_id = "BB" + "0" * 32
    response = client.delete(batch_url(batch_id, campaign="c%00"), headers=headers())

    assert response.status_code == 404
    assert response.text == f"Batch {batch_id} was not found"


def test_the_api_starts_the_bulk_lane_on_a_batch_right_after_its_202(
    client: TestClient[Litestar], db: Database, demo: Demo, migrated: Settings, redis_url: str
) -> None:
    batch_id = bulk(client, [{"callerId": n} for n in NUMBERS]).json()["batchId"]

    # Its messages are on the bulk lane's queue, none on the realtime lane's.
    queue = redis.Redis.from_url(redis_url)
    assert queue.llen(bulk_queue(migrated)) == 1
    assert queue.llen(migrated.send_queue) == 0
    with db.transaction() as session:
        unpublished = select(Message.sid).where(
            Message.batch_id == batch_id, Message.published_at.is_(None)
        )
        assert list(session.scalars(unpublished)) == []


@pytest.mark.parametrize(("text", "links"), [("Go <link>", 2), ("Go <link> " + "z" * 200, 0)])
def test_a_shorten_links_campaign_makes_a_link_only_for_a_row_it_stores(
    client: TestClient[Litestar], db: Database, demo: Demo, text: str, links: int
) -> None:
    short_links_campaign(db, demo, text, max_segments=1)

    answer = bulk(
        client, [{"callerId": n} for n in NUMBERS[:2]], url=f"{V3}/campaign/sms/short/bulk"
    ).json()

    assert answer["accepted"] == links
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(ShortLink)) == links
        bodies = list(session.scalars(select(Message.body)))
    assert all("/l/" in body for body in bodies)


def test_a_retry_while_its_twin_is_still_storing_waits_and_gets_its_answer(
    migrated: Settings, db: Database, demo: Demo
) -> None:
    # A lock timeout far shorter than storing the batch takes: the retry's wait for the key
    # must not end in a 503.
    settings = migrated.model_copy(update={"database_lock_timeout": timedelta(seconds=1)})
    rows = [{"callerId": f"+1202{2_000_000 + i:07d}"} for i in range(20000)]
    answers: dict[str, httpx.Response] = {}
    with TestClient(app=create_app(settings)) as client:
        first = threading.Thread(
            target=lambda: answers.update(first=bulk(client, rows, key="twins")), daemon=True
        )
        first.start()
        copying = "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY messages%'"
        # Autocommit: within a transaction pg_stat_activity would show one snapshot throughout.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            wait_until(lambda: admin.execute(text(copying)).first() is not None, 30, "storing")
        answers["second"] = bulk(client, rows, key="twins")
        first.join(60)

    assert answers["first"].status_code == 202, answers["first"].text
    assert answers["second"].status_code == 202, answers["second"].text
    assert answers["second"].headers["idempotency-replay"] == "true"
    assert answers["second"].json() == answers["first"].json()
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(BulkBatch)) == 1
    assert len(stored(db)) == len(rows)


def test_credentials_are_checked_before_the_body_is_stored(
    small_limits: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    # Over the byte limit, but from a stranger: refused as one before a byte is spooled.
    response = small_limits.post(
        BULK,
        headers={**headers(key="0" * 24), "Content-Type": "application/json"},
        content=b"[" + b" " * 10_000 + b"]",
    )

    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED_BODY


@pytest.mark.timeout(120)  # a wait for a turn that blocked the event loop would hang here
def test_a_bulk_request_waiting_for_its_turn_does_not_hold_up_the_api(
    migrated: Settings, db: Database, demo: Demo
) -> None:
    # One batch stored at a time: the second waits, and meanwhile the API answers others.
    settings = migrated.model_copy(update={"bulk_concurrency": 1})
    rows = [{"callerId": f"+1202{2_000_000 + i:07d}"} for i in range(20000)]
    answers: dict[str, httpx.Response] = {}
    with TestClient(app=create_app(settings)) as client:
        threads = [
            threading.Thread(
                target=lambda name=name: answers.update({name: bulk(client, rows, key=name)}),
                daemon=True,
            )
            for name in ("first", "second")
        ]
        threads[0].start()
        copying = "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY messages%'"
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            wait_until(lambda: admin.execute(text(copying)).first() is not None, 30, "storing")
        threads[1].start()
        time.sleep(0.5)  # the second is waiting for its turn by now
        started = time.monotonic()
        live = client.get("/health/live")
        waited = time.monotonic() - started
        still_storing = "first" not in answers
        for thread in threads:
            thread.join(90)

    assert live.status_code == 200
    assert still_storing, "the first batch must still be storing when the API is asked"
    assert waited < 1.0, f"the API answered after {waited:.1f} s"
    assert answers["first"].status_code == answers["second"].status_code == 202
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(BulkBatch)) == 2


def test_many_small_chunks_with_tokens_short_links_and_bad_rows_store_each_row_once_in_place(
    client: TestClient[Litestar], db: Database, demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of three, so the numbers checked ahead, the COPY of the chunk before and the
    # chunks that must wait for it (a jpToken, a short link) all take turns many times.
    monkeypatch.setattr("shared.messages.bulk.CHUNK", 3)
    short_links_campaign(db, demo, "Go <link>")
    numbers = [f"+1202{2_100_000 + i:07d}" for i in range(20)]
    tokens = {i: issue_demo_token(client, numbers[i]) for i in (4, 11, 12)}
    rows: list[dict[str, Any]] = [
        {"callerId": n, **({"jpToken": tokens[i]} if i in tokens else {})}
        for i, n in enumerate(numbers)
    ]
    rows[7] = {"callerId": "not a number"}
    rows[15] = {"jpToken": "Nope123", "callerId": numbers[15]}

    answer = bulk(client, rows, url=f"{V3}/campaign/sms/short/bulk").json()

    assert answer["accepted"] == 18
    assert [(r["row"], r["parameter"]) for r in answer["rejected"]] == [
        (8, "callerId"),
        (16, "jpToken"),
    ]
    messages = stored(db, answer["batchId"])
    kept = [n for i, n in enumerate(numbers) if i not in (7, 15)]
    assert sorted(m.to_number for m in messages) == sorted(kept)
    assert len({m.sid for m in messages}) == 18
    with db.transaction() as session:
        by_number = {
            number: token
            for number, token in session.execute(
                select(Message.to_number, InteractionToken.token).join(
                    InteractionToken, InteractionToken.id == Message.token_id
                )
            )
        }
        assert session.scalar(select(func.count()).select_from(ShortLink)) == 18
    assert by_number == {numbers[i]: tokens[i] for i in (4, 11, 12)}


def test_a_batch_that_grows_the_table_much_brings_postgresql_s_statistics_up_to_date(
    client: TestClient[Litestar], db: Database, demo: Demo
) -> None:
    def estimate() -> float:
        with db.engine.connect() as connection:
            return float(connection.execute(text(ESTIMATE)).scalar_one())

    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text("ANALYZE messages"))  # of the empty table
    rows = [{"callerId": f"+1202{2_200_000 + i:07d}"} for i in range(40)]

    assert bulk(client, rows).status_code == 202

    # The API analyzed after its 202 (40 rows is more than a tenth of 0)...
    assert estimate() == 40
    # ...and would not for a batch that changes the table's size little.
    with db.transaction() as session:
        assert not refresh_statistics(session, 3)
