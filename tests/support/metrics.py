"""Reading Prometheus expositions in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import V3
from tests.support.data import CALLER, headers


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` (labels matched exactly), or None if absent."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


def value(exposition: str, name: str, **labels: str) -> float:
    """As `sample`, with an absent sample counting as 0 (a counter not yet incremented)."""
    return sample(exposition, name, **labels) or 0.0


def label_values(exposition: str, name: str, label: str) -> set[str]:
    """Every value `label` takes among the samples named `name`."""
    return {
        found.labels[label]
        for family in text_string_to_metric_families(exposition)
        for found in family.samples
        if found.name == name and label in found.labels
    }


def scrape(url: str) -> str:
    """GET a /metrics page (each call on a new connection)."""
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return response.text


def send(client: httpx.Client, token: str, **extra: str) -> httpx.Response:
    """A Send SMS v3 for the demo account's campaign1 (extra headers override the demo's)."""
    return client.post(
        f"{V3}/campaign/sms/campaign1",
        headers=headers(**extra),
        json={"callerId": CALLER, "jpToken": token},
    )
