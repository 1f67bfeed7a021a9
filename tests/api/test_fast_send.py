"""The lean Send SMS v3 route (api/fast_send.py) against the Litestar route it stands in front of:
the same request gets the same answer from both, byte for byte but for the messageSid, and
leaves the same rows; what the lean route does not take, the Litestar route answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import update

from api.app import create_app
from api.fast_send import FastSend
from shared.core.db import Database
from shared.core.models import InteractionToken, utcnow
from shared.core.settings import Settings
from tests.support.api import V3, issue_token, put_campaign, stored_messages
from tests.support.data import CALLER, KEY, SENDER, TENANT, Demo, headers
from tests.support.metrics import value

SID = re.compile(rb"SM[0-9a-f]{32}")
SEND_URL = f"{V3}/campaign/sms/campaign1"


def lean_route(client: TestClient[Litestar]) -> FastSend:
    """The FastSend in front of `client`'s app (inside the metrics wrapper)."""
    handler: Any = client.app.asgi_handler
    while not isinstance(handler, FastSend):
        handler = handler.app
    return handler


@pytest.fixture
def routed(migrated: Settings, db: Database) -> Iterator[TestClient[Litestar]]:
    """The same API with the lean route off: every request through Litestar's route."""
    with TestClient(app=create_app(migrated.model_copy(update={"lean_send": False}))) as client:
        yield client


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers in order and body, with the messageSid blanked (each send has its own)."""
    return (
        response.status_code,
        [
            (name, SID.sub(b"SM", value.encode()).decode())
            for name, value in response.headers.items()
        ],
        SID.sub(b"SM", response.content),
    )


def token(client: TestClient[Litestar], caller: str = CALLER) -> str:
    return issue_token(client, caller)


# Each case: a request (headers, body bytes and, if not campaign1, the campaign) built with a
# fresh jpToken issued by `client`; its name starts with the status both routes answer.
Case = Callable[
    [TestClient[Litestar]], tuple[dict[str, str], bytes] | tuple[dict[str, str], bytes, str]
]


def _json(body: str) -> bytes:
    return body.encode()


CASES: dict[str, Case] = {
    "placed, text": lambda c: (
        headers(),
        _json(f'{{"from": "{SENDER}", "callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "placed, JSON asked for": lambda c: (
        headers(Accept="application/json"),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "placed, text asked for": lambda c: (
        headers(Accept="text/plain"),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "placed, an Accept header that cannot be read (q=inf)": lambda c: (
        headers(Accept="text/plain;q=inf"),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "placed, the caller as a JSON number": lambda c: (
        headers(),
        _json(f'{{"callerId": 2125551234, "jpToken": "{token(c, "+12125551234")}"}}'),
    ),
    "400 callerId missing": lambda c: (headers(), _json(f'{{"jpToken": "{token(c)}"}}')),
    "400 body not JSON": lambda c: (headers(), b"{not json"),
    "400 body a list": lambda c: (headers(), b"[]"),
    "400 jpToken missing": lambda c: (headers(), _json(f'{{"callerId": "{CALLER}"}}')),
    "400 sender not the account's": lambda c: (
        headers(),
        _json(f'{{"from": "+19999999999", "callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "400 Idempotency-Key too long": lambda c: (
        headers(**{"Idempotency-Key": "k" * 256}),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "401 wrong key": lambda c: (
        headers(key="not-the-key"),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "401 no headers": lambda c: ({}, _json(f'{{"callerId": "{CALLER}"}}')),
    "404 unknown campaign": lambda c: (
        headers(),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
        "no-such-campaign",
    ),
    "400 unknown environment": lambda c: (
        headers(**{"Environment-Name": "NOPE"}),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "{token(c)}"}}'),
    ),
    "400 jpToken unknown": lambda c: (
        headers(),
        _json(f'{{"callerId": "{CALLER}", "jpToken": "ZZZZZZ9"}}'),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_lean_route_answers_as_the_litestar_route(
    demo: Demo,
    db: Database,
    client: TestClient[Litestar],
    routed: TestClient[Litestar],
    case: str,
) -> None:
    lean = lean_route(client)
    fast = post(client, *CASES[case](client))
    assert lean.answered == 1, "the lean route did not take an ordinary request"
    slow = post(routed, *CASES[case](client))

    assert answer(fast) == answer(slow)
    assert fast.status_code == (200 if case.startswith("placed") else int(case[:3]))
    assert len(stored_messages(db)) == (2 if fast.status_code == 200 else 0)


def post(
    client: TestClient[Litestar],
    request_headers: dict[str, str],
    body: bytes,
    campaign: str = "campaign1",
) -> httpx.Response:
    return client.post(f"{V3}/campaign/sms/{campaign}", headers=request_headers, content=body)


def test_expired_token_is_403_on_both_routes(
    demo: Demo, db: Database, client: TestClient[Litestar], routed: TestClient[Litestar]
) -> None:
    answers = []
    for test_client in (client, routed):
        jp_token = issue_token(client)
        with db.transaction() as session:
            session.execute(
                update(InteractionToken)
                .where(InteractionToken.token == jp_token)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        body = f'{{"callerId": "{CALLER}", "jpToken": "{jp_token}"}}'.encode()
        answers.append(answer(test_client.post(SEND_URL, headers=headers(), content=body)))
    assert answers[0] == answers[1]
    assert answers[0][0] == 403
    assert answers[0][2] == b"Token expired"
    assert lean_route(client).answered == 1


def test_idempotent_replay_and_conflict_match_the_litestar_route(
    demo: Demo, client: TestClient[Litestar], routed: TestClient[Litestar]
) -> None:
    answers: dict[str, list[tuple[int, list[tuple[str, str]], bytes]]] = {}
    for name, test_client in (("lean", client), ("routed", routed)):
        jp_token = issue_token(client)
        keyed = headers(**{"Idempotency-Key": f"key-{name}"})
        body = f'{{"callerId": "{CALLER}", "jpToken": "{jp_token}"}}'.encode()
        other = f'{{"callerId": "+12025550123", "jpToken": "{jp_token}"}}'.encode()
        answers[name] = [
            answer(test_client.post(SEND_URL, headers=keyed, content=body)),
            answer(test_client.post(SEND_URL, headers=keyed, content=body)),
            answer(test_client.post(SEND_URL, headers=keyed, content=other)),
        ]
    assert answers["lean"] == answers["routed"]
    assert [status for status, _, _ in answers["lean"]] == [200, 200, 422]
    assert ("idempotency-replay", "true") in answers["lean"][1][1]
    assert lean_route(client).answered == 3


# What the lean route leaves to Litestar's: (name, headers, body or None for a chunked body, path)
UNUSUAL: list[tuple[str, list[tuple[str, str]], bytes | None, str]] = [
    (
        "another route's fixed segment as the campaign",
        [("Tenant-Id", TENANT), ("Application-Key", KEY)],
        b"{}",
        f"{V3}/campaign/sms/notify",
    ),
    ("a chunked body", [("Tenant-Id", TENANT), ("Application-Key", KEY)], None, SEND_URL),
    (
        "a body over the limit",
        [("Tenant-Id", TENANT), ("Application-Key", KEY)],
        b" " * (64 * 1024 + 1),
        SEND_URL,
    ),
    (
        "a control character in a header",
        [("Tenant-Id", TENANT), ("Application-Key", KEY), ("Environment-Name", "PR\x01OD")],
        b"{}",
        SEND_URL,
    ),
    ("a trailing slash", [("Tenant-Id", TENANT), ("Application-Key", KEY)], b"{}", SEND_URL + "/"),
    (
        "the caller in the path",
        [("Tenant-Id", TENANT), ("Application-Key", KEY)],
        b"{}",
        f"{SEND_URL}/callerid/{CALLER}",
    ),
]


@pytest.mark.parametrize("case", UNUSUAL, ids=[case[0] for case in UNUSUAL])
def test_unusual_requests_are_answered_by_the_litestar_route(
    demo: Demo,
    db: Database,
    client: TestClient[Litestar],
    routed: TestClient[Litestar],
    case: tuple[str, list[tuple[str, str]], bytes | None, str],
) -> None:
    _, request_headers, body, path = case
    # A campaign may be called "notify": the router still sends …/sms/notify elsewhere.
    put_campaign(db, "notify")

    def post(test_client: TestClient[Litestar]) -> httpx.Response:
        content: Any = body if body is not None else iter([b"{", b"}"])
        return test_client.post(path, headers=request_headers, content=content)

    fast, slow = post(client), post(routed)
    assert lean_route(client).answered == 0
    assert answer(fast) == answer(slow)
    assert fast.status_code != 500


def test_wrong_keys_on_the_lean_route_block_the_address(
    demo: Demo, client: TestClient[Litestar]
) -> None:
    body = f'{{"callerId": "{CALLER}"}}'.encode()
    guesses = [
        client.post(SEND_URL, headers=headers(key="0" * 24), content=body).status_code
        for _ in range(20)
    ]
    blocked = client.post(SEND_URL, headers=headers(), content=body)

    assert guesses == [401] * 20
    assert lean_route(client).answered == 20
    assert blocked.status_code == 429
    assert blocked.text.startswith("Too many requests with missing or wrong credentials")


def test_a_header_sent_twice_goes_to_the_litestar_route(
    demo: Demo, client: TestClient[Litestar]
) -> None:
    # HTTP clients join a repeated header into one line, so the scope is built here by hand.
    lean = lean_route(client)
    passed: list[Any] = []

    async def litestar_route(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope)

    async def no_body() -> Any:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        raise AssertionError("the lean route answered")

    scope: Any = {
        "type": "http",
        "method": "POST",
        "path": SEND_URL,
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "headers": [
            (b"host", b"testserver"),
            (b"content-length", b"2"),
            (b"tenant-id", TENANT.encode()),
            (b"tenant-id", TENANT.encode()),
            (b"application-key", KEY.encode()),
        ],
    }
    bypass = FastSend(litestar_route, lean.litestar, lean.groups, lean.guard)
    asyncio.run(bypass(scope, no_body, send))

    assert passed == [scope]
    assert bypass.answered == 0


def test_a_request_without_accept_gets_the_text_on_both_routes(
    demo: Demo, client: TestClient[Litestar], routed: TestClient[Litestar]
) -> None:
    answers = []
    for test_client in (client, routed):
        test_client.headers.pop("accept", None)  # httpx sends */* unless told not to
        body = f'{{"callerId": "{CALLER}", "jpToken": "{issue_token(client)}"}}'.encode()
        answers.append(answer(test_client.post(SEND_URL, headers=headers(), content=body)))
    assert answers[0] == answers[1]
    assert answers[0][0] == 200
    assert lean_route(client).answered == 1


def test_metrics_count_the_lean_routes_answers_under_the_send_route(
    demo: Demo, client: TestClient[Litestar]
) -> None:
    template = "/interact/version/3/account/{account_id}/resources/campaign/sms/{campaign_id}"
    before = client.get("/metrics").text
    body = f'{{"callerId": "{CALLER}", "jpToken": "{issue_token(client)}"}}'.encode()
    placed = client.post(SEND_URL, headers=headers(), content=body)
    refused = client.post(SEND_URL, headers=headers(key="0" * 24), content=body)
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (placed.status_code, refused.status_code) == (200, 401)
    assert lean_route(client).answered == 2
    for status in ("200", "401"):
        assert delta("smsd_http_requests_total", method="POST", route=template, status=status) == 1
        assert delta("smsd_accept_latency_seconds_count", route=template, status=status) == 1


def test_the_lean_route_stays_off_when_the_route_does_more_than_it_repeats(
    client: TestClient[Litestar],
) -> None:
    lean = lean_route(client)

    async def another_hook(request: Any) -> None:
        return None

    assert lean.unfit(client.app.before_request) is None
    assert lean.unfit(another_hook) is not None
