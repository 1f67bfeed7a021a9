"""A caller's status callback endpoint, for the tests: a real HTTP server on loopback that keeps
every POST it gets and answers with what the test tells it to."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.services import free_port


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


class Receiver:
    """`answer(received) -> status` decides each answer (200 by default); `delay` seconds pass
    before it is sent. `stop()` closes the port (connections refused), `start()` opens it
    again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.answer: Callable[[Received], int] = lambda _: 200
        self.delay = 0.0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/status") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                got = Received(
                    self.path, dict(self.headers.items()), self.rfile.read(length), time.time()
                )
                with receiver._lock:
                    receiver.received.append(got)
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.answer(got)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.url("/redirected"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = _Server(("127.0.0.1", self.port), Handler)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, sid: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            got = list(self.received)
        return [r.json for r in got if sid is None or r.json["messageSid"] == sid]

    def statuses(self, sid: str) -> list[str]:
        return [body["status"] for body in self.bodies(sid)]


class _Server(ThreadingHTTPServer):
    # A listen backlog for a deliverer's 50 connections at once (http.server's is 5).
    request_queue_size = 128
    daemon_threads = True


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
