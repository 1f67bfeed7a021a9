"""Hostile bodies and parameters are the caller's documented 400, logged without a traceback."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from tests.support.api import V3, issue_token
from tests.support.data import Demo, headers

V2 = V3.replace("version/3", "version/2")
SOAP = "/interact/version/2/agent/soap"
DEEP = b'{"callerId": ' + b"[" * 1000 + b"]" * 1000 + b"}"

# Every route that reads a JSON body, with the parameter a bad body is named as.
JSON_ROUTES = [
    f"{V3}/campaign/sms/campaign1",
    f"{V3}/campaign/sms/campaign1/callerid/+972544696388",
    f"{V3}/campaign/sms/notify/campaign1",
    f"{V3}/token",
    f"{V2}/campaign/sms/campaign1",
    f"{V2}/campaign/url/campaign1",
]
BODIES = {
    "invalid-utf8": b'{"callerId": "+97254\xff\xfe4696388", "jpToken": "Aejhib7"}',
    "nested-1000-deep": DEEP,
    "nested-object-1000-deep": b'{"a":' * 1000 + b"1" + b"}" * 1000,
    "float-1e400": b'{"callerId": 1e400}',
    "integer-400-digits": b'{"callerId": %s, "additionalParams": %s}' % (b"9" * 400, b"9" * 400),
    "integer-10000-digits": b'{"lifetimeSeconds": ' + b"9" * 10_000 + b"}",
    "nul-escaped": b'{"callerId": "\\u0000", "additionalParams": "a\\u0000"}',
    "nul-raw": b'{"callerId": "\x00"}',
    "lone-surrogate": b'{"callerId": "\\ud800"}',
}


class Captured(logging.Handler):
    """Every line logged meanwhile: other libraries' through stdlib logging, ours as the JSON
    lines structlog writes straight to stderr (tests log JSON)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._capsys = capsys
        self._ours: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def ours(self) -> list[dict[str, Any]]:
        for line in self._capsys.readouterr().err.splitlines():
            # Anything else on stderr (a traceback printed raw, a line not rendered as JSON)
            # counts as a problem: a hostile request must not cause it.
            try:
                self._ours.append(json.loads(line))
            except ValueError:
                self._ours.append({"event": line, "level": "error", "raw": True})
        return self._ours

    def problems(self) -> list[str]:
        """Error lines and tracebacks: a hostile request must cause neither."""
        return [
            str(record.msg)
            for record in self.records
            if record.levelno >= logging.ERROR
            or record.exc_info
            or (isinstance(record.msg, dict) and record.msg.get("exc_info"))
        ] + [
            str(line.get("event"))
            for line in self.ours()
            if line.get("level") in ("error", "critical") or "exception" in line
        ]

    def warnings(self) -> list[str]:
        return [
            str(record.msg.get("event") if isinstance(record.msg, dict) else record.msg)
            for record in self.records
            if record.levelno == logging.WARNING
        ] + [str(line.get("event")) for line in self.ours() if line.get("level") == "warning"]


@pytest.fixture
def logs(client: TestClient[Litestar], capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    """What the app logs during the test (the app's own handler is installed by then)."""
    handler = Captured(capsys)
    capsys.readouterr()  # only what this test's requests log
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_hostile_json_is_a_400_on_every_json_route(
    client: TestClient[Litestar], demo: Demo, logs: Captured, route: str, body: bytes
) -> None:
    response = client.post(
        route, headers={**headers(), "Content-Type": "application/json"}, content=body
    )

    assert response.status_code == 400, response.text
    assert response.text.startswith("missing or invalid parameter ")
    assert logs.problems() == []


@pytest.mark.parametrize("body", ["invalid-utf8", "nested-1000-deep", "float-1e400"])
def test_an_unreadable_body_is_named_body_and_logged_as_a_warning(
    client: TestClient[Litestar], demo: Demo, logs: Captured, body: str
) -> None:
    response = client.post(
        f"{V3}/campaign/sms/campaign1",
        headers={**headers(), "Content-Type": "application/json"},
        content=BODIES[body],
    )

    assert (response.status_code, response.text) == (400, "missing or invalid parameter body")
    assert "request.unreadable_body" in logs.warnings()
    assert logs.problems() == []


REPORT = f"{V3}/reports/deflected-calls"
QUERIES = {
    "limit-superscript-two": ("limit", "²"),
    "limit-arabic-three": ("limit", "٣"),
    "limit-fullwidth-one": ("limit", "\uff11"),
    "limit-400-digits": ("limit", "9" * 400),
    "limit-5000-digits": ("limit", "1" * 5000),
    "limit-1e400": ("limit", "1e400"),
    "limit-nul": ("limit", "1\x00"),
    "from-arabic-digits": ("from", "٢٠٢٤-01-01T00:00:00+00:00"),
    "from-fullwidth-digits": ("from", "\uff12\uff10\uff12\uff14-01-01T00:00:00+00:00"),
    "from-nul": ("from", "2024-01-01T00:00:00+00:00\x00"),
    "from-huge-year": ("from", "9" * 400 + "-01-01T00:00:00+00:00"),
    "to-superscript": ("to", "2024-01-0²T00:00:00+00:00"),
    "to-huge": ("to", "1e400"),
}


@pytest.mark.parametrize(("name", "value"), QUERIES.values(), ids=QUERIES.keys())
def test_hostile_report_parameters_are_a_400_naming_them(
    client: TestClient[Litestar], demo: Demo, logs: Captured, name: str, value: str
) -> None:
    response = client.get(REPORT, headers=headers(), params={name: value})

    assert (response.status_code, response.text) == (400, f"missing or invalid parameter {name}")
    assert logs.problems() == []


# Path parameters with a NUL or another control character (percent-encoded; headers cannot
# carry them at all: the HTTP parser refuses them). A campaign id with one is a 404, as
# test_interaction_link says: no such campaign can exist.
PATHS = {
    "caller": (f"{V3}/campaign/sms/campaign1/callerid/+97254%004696388", "callerId"),
    "caller-newline": (f"{V3}/campaign/sms/campaign1/callerid/+97254%0A4696388", "callerId"),
    "account": ("/interact/version/3/account/1234%005678/resources/token", "accountID"),
}


@pytest.mark.parametrize(("path", "parameter"), PATHS.values(), ids=PATHS.keys())
def test_control_characters_in_the_path_are_a_400_naming_the_parameter(
    client: TestClient[Litestar], demo: Demo, logs: Captured, path: str, parameter: str
) -> None:
    token = issue_token(client)
    response = client.post(
        path, headers=headers(), json={"callerId": "+972544696388", "jpToken": token}
    )

    assert (response.status_code, response.text) == (
        400,
        f"missing or invalid parameter {parameter}",
    )
    assert "request.control_characters" in logs.warnings()
    assert logs.problems() == []


def test_a_nul_in_a_message_sid_is_a_400(
    client: TestClient[Litestar], demo: Demo, logs: Captured
) -> None:
    response = client.get(f"{V3}/messages/SM%00", headers=headers())

    assert (response.status_code, response.text) == (400, "missing or invalid parameter messageSid")
    assert logs.problems() == []


SOAP_BODIES = {
    "invalid-utf8": b'<?xml version="1.0" encoding="UTF-8"?><a>\xff\xfe</a>',
    "nul-character-reference": b"<a>&#0;</a>",
    "nested-1000-deep": b"<a>" * 1000 + b"</a>" * 1000,
    "raw-nul": b"<a>\x00</a>",
}


@pytest.mark.parametrize("body", SOAP_BODIES.values(), ids=SOAP_BODIES.keys())
def test_hostile_soap_envelopes_are_a_client_fault(
    client: TestClient[Litestar], demo: Demo, logs: Captured, body: bytes
) -> None:
    response = client.post(SOAP, headers={**headers(), "Content-Type": "text/xml"}, content=body)

    # SOAP 1.1 answers every fault with 500; the fault code says whose fault it is.
    assert response.status_code == 500
    assert "<faultcode>SOAP-ENV:Client</faultcode>" in response.text
    assert logs.problems() == []
