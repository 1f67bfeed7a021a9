"""What the simulator tests share: the behaviour each test starts from, the in-process simulator's
handle, and the webhook receiver standing for our API (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx

from shared.core.settings import Settings

# What each test starts from: quick answers and quick callbacks, no failures, no scripts.
DEFAULT_BEHAVIOUR = {
    "latency_ms": 0,
    "failure_rate": 0,
    "permanent_failure_rate": 0,
    "delivery_delay_ms": 20,
    "final_status": "delivered",
    "callbacks": True,
    "timeout_ms": 100,
}


@dataclass(frozen=True)
class Sim:
    url: str  # http://127.0.0.1:<port>
    tls_url: str  # https://127.0.0.1:<tls_port>
    tls_host: str  # 127.0.0.1:<tls_port>, for Vonage's HttpClientOptions(rest_host=...)
    ca_bundle: Path
    settings: Settings
    control: httpx.Client


@dataclass(frozen=True)
class Hook:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"

    @property
    def params(self) -> dict[str, str]:
        """The webhook's parameters, however it came: query (GET), JSON or form."""
        if self.method == "GET":
            return dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        if self.headers.get("content-type", "").startswith("application/json"):
            data: dict[str, str] = json.loads(self.body)
            return data
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class Receiver:
    """A tiny HTTP server standing for our API's webhooks."""

    base_url: str
    hooks: queue.Queue[Hook] = field(default_factory=queue.Queue)
    status: int = 200

    def url(self, path: str) -> str:
        return self.base_url + path

    def next(self, timeout: float = 5) -> Hook:
        return self.hooks.get(timeout=timeout)
