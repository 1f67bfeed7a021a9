"""Prometheus metrics of the API, served at GET /metrics (text exposition format).

One API process keeps its samples in memory. Several processes behind one address
(`sms-dispatch api --workers N`, gunicorn) must add up, not answer for whichever process took
the scrape: start them with PROMETHEUS_MULTIPROC_DIR set to a directory that only this
service's processes share and that is emptied before they start. Each process then writes
its samples there and /metrics sums them (multiprocess mode of prometheus_client)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import anyio.to_thread
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

METRICS_PATH = "/metrics"
# Requests no route matched (404, 405): one label value, whatever path a scanner tried.
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Decided once, as prometheus_client does when it is first imported.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

REGISTRY = CollectorRegistry(auto_describe=True)
if MULTIPROCESS_DIR is None:
    # Process metrics describe one process; summed over several they would mean nothing.
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        REGISTRY.register(collector)

HTTP_REQUESTS = Counter(
    "smsd_http_requests",
    "HTTP requests answered, by method, route template and status code (not /metrics).",
    ["method", "route", "status"],
    registry=REGISTRY,
)
ACCEPT_LATENCY = Histogram(
    "smsd_accept_latency_seconds",
    "Time to answer a send request (Send SMS v3, v2 and SOAP), by route template and status.",
    ["route", "status"],
    registry=REGISTRY,
)


@get(METRICS_PATH, include_in_schema=False)
async def metrics(request: Request[object, object, State]) -> Response[bytes]:
    """The exposition, in the format the scraper asks for (Prometheus text by default)."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    # Exactly the encoder's content type (Litestar would add a second charset to text/plain).
    headers = {"content-type": content_type}
    if MULTIPROCESS_DIR is None:
        return Response(encode(REGISTRY), media_type=content_type, headers=headers)

    def collect() -> bytes:
        # A fresh registry per scrape: the collector reads every process's files.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
        return encode(registry)

    return Response(
        await anyio.to_thread.run_sync(collect), media_type=content_type, headers=headers
    )


def instrument(app: Litestar, send_handlers: Iterable[HTTPRouteHandler]) -> None:
    """Count every request `app` answers; time those of `send_handlers`."""
    app.asgi_handler = RequestMetrics(
        app.asgi_handler, frozenset(handler.handler_name for handler in send_handlers)
    )


class RequestMetrics:
    """ASGI wrapper outside Litestar's routing, so unmatched paths are counted too."""

    def __init__(self, app: ASGIApp, send_handlers: frozenset[str]) -> None:
        self.app = app
        self.send_handlers = send_handlers
        # The labelled children, found once per label set: `labels()` takes a lock and
        # builds a key on every call, a tenth of what this wrapper costs a request.
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._latencies: dict[tuple[str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.record(scope, status, time.perf_counter() - started)

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        # The router put the matched route in the scope; nothing there means no route matched.
        handler = scope.get("route_handler")
        route = (scope.get("path_template") or UNMATCHED) if handler is not None else UNMATCHED
        if route == METRICS_PATH:
            return
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = HTTP_REQUESTS.labels(method=method, route=route, status=str(status))
            self._counters[(method, route, status)] = counter
        counter.inc()
        if handler is not None and handler.handler_name in self.send_handlers:
            latency = self._latencies.get((route, status))
            if latency is None:
                latency = ACCEPT_LATENCY.labels(route=route, status=str(status))
                self._latencies[(route, status)] = latency
            latency.observe(seconds)
