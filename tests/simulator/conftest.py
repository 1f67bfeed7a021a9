"""The simulator served in-process on free HTTP and HTTPS ports, a webhook receiver standing
for our API, and the CA bundle the provider SDKs need to trust the simulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shared.core.settings import Settings
from simulator.server import SimulatorServer
from tests.simulator.support import DEFAULT_BEHAVIOUR, Hook, Receiver, Sim


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorServer]:
    settings = Settings(
        simulator_host="127.0.0.1",
        simulator_tls_dir=tmp_path_factory.mktemp("simulator-tls"),
        simulator_latency=timedelta(0),
        simulator_delivery_delay=timedelta(milliseconds=20),
        log_level="WARNING",
        log_json=True,
    )
    server = SimulatorServer(settings, port=0, tls_port=0)
    thread = threading.Thread(target=server.run, name="simulator", daemon=True)
    thread.start()
    assert server.started.wait(10), "the simulator did not start"
    yield server
    server.stop()
    thread.join(10)
    assert not thread.is_alive(), "the simulator did not stop"


@pytest.fixture
def sim(sim_server: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    """The simulator, emptied and at its defaults, with REQUESTS_CA_BUNDLE trusting it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sim_server.ca_bundle))
    with httpx.Client(base_url=sim_server.url, timeout=10) as control:
        assert control.delete("/messages").status_code == 204
        assert control.post("/control", json=DEFAULT_BEHAVIOUR).status_code == 200
        yield Sim(
            url=sim_server.url,
            tls_url=sim_server.tls_url,
            tls_host=f"{sim_server.host}:{sim_server.tls_port}",
            ca_bundle=sim_server.ca_bundle,
            settings=sim_server.settings,
            control=control,
        )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            headers = {k.lower(): v for k, v in self.headers.items()}
            hook = Hook(self.path, headers, self.rfile.read(length), self.command)
            box[0].hooks.put(hook)
            self.send_response(box[0].status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST  # noqa: N815 - Vonage's receipts may come as GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(base_url=f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
    thread.start()
    yield box[0]
    server.shutdown()
    server.server_close()
    thread.join(5)
