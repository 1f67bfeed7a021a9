"""The OpenAPI document describes every endpoint of the Interact API."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import TestClient

V3 = "/interact/version/3/account/{account_id}/resources"

ENDPOINTS = [
    ("post", f"{V3}/campaign/sms/{{campaign_id}}"),
    ("post", f"{V3}/campaign/sms/{{campaign_id}}/callerid/{{caller_id}}"),
    ("post", f"{V3}/token"),
    ("get", f"{V3}/messages/{{message_sid}}"),
    ("get", f"{V3}/reports/deflected-calls"),
]


@pytest.mark.parametrize(
    ("method", "path"),
    ENDPOINTS,
    ids=["send-sms", "send-sms-caller-in-path", "generate-token", "message", "report"],
)
def test_openapi_document_lists_the_endpoint(
    client: TestClient[Litestar], method: str, path: str
) -> None:
    response = client.get("/schema/openapi.json")

    assert response.status_code == 200
    assert method in response.json()["paths"].get(path, {}), sorted(response.json()["paths"])


def test_send_sms_operation_documents_every_seed_status(client: TestClient[Litestar]) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]

    responses = paths[f"{V3}/campaign/sms/{{campaign_id}}"]["post"]["responses"]

    assert {"200", "400", "401", "403", "404", "500"} <= set(responses)


def test_send_sms_operation_documents_the_seed_headers(client: TestClient[Litestar]) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]

    parameters = paths[f"{V3}/campaign/sms/{{campaign_id}}"]["post"]["parameters"]

    header_names = {p["name"] for p in parameters if p["in"] == "header"}
    assert {"Tenant-Id", "Application-Key", "Environment-Name"} <= header_names
