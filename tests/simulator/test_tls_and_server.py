"""The simulator's certificate, and `sms-dispatch simulator` serving HTTP and HTTPS together."""

from __future__ import annotations

import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import certifi
import httpx
import pytest
from cryptography import x509

from simulator.server import SimulatorServer
from simulator.tls import ensure_certificate
from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_certificate_is_made_once_and_trusted_through_the_bundle(tmp_path: Path) -> None:
    cert, key, bundle = ensure_certificate(tmp_path / "tls")
    first = cert.read_bytes()
    assert ensure_certificate(tmp_path / "tls") == (cert, key, bundle)
    assert cert.read_bytes() == first, "an existing certificate is reused"

    certificate = x509.load_pem_x509_certificate(first)
    assert certificate.subject.rfc4514_string() == "CN=localhost"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert key.stat().st_mode & 0o077 == 0, "the key is private"
    content = bundle.read_bytes()
    assert content.startswith(Path(certifi.where()).read_bytes().rstrip(b"\n"))
    assert content.endswith(first)


def test_a_bundle_trusts_the_simulator_by_name_and_address(sim_server: SimulatorServer) -> None:
    context = ssl.create_default_context(cafile=sim_server.ca_bundle)
    for host in ("127.0.0.1", "localhost"):
        response = httpx.get(f"https://{host}:{sim_server.tls_port}/health", verify=context)
        assert response.text == "ok"
    with pytest.raises(httpx.ConnectError):  # certifi alone does not trust it
        httpx.get(f"{sim_server.tls_url}/health", verify=ssl.create_default_context())


def test_http_and_https_share_one_simulator(sim_server: SimulatorServer) -> None:
    context = ssl.create_default_context(cafile=sim_server.ca_bundle)
    with httpx.Client(base_url=sim_server.url) as plain:
        plain.delete("/messages")
        sent = plain.post("/messages", json={"to": "+15558675310", "from": "x", "body": "hi"})
        assert sent.status_code == 201
    messages = httpx.get(f"{sim_server.tls_url}/messages", verify=context).json()
    assert [m["id"] for m in messages] == [sent.json()["id"]]


def _wait_for(url: str, verify: ssl.SSLContext | bool, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "the simulator exited"
        try:
            if httpx.get(url, verify=verify, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def test_command_serves_both_ports_and_stops_on_sigterm(tmp_path: Path) -> None:
    port, tls_port = free_port(), free_port()
    env = {
        **os.environ,
        "SMSD_SIMULATOR_TLS_DIR": str(tmp_path / "tls"),
        "SMSD_LOG_JSON": "true",
    }
    command = [sys.executable, "-m", "shared.cli", "simulator", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--tls-port", str(tls_port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", False, process)
        context = ssl.create_default_context(cafile=tmp_path / "tls" / "bundle.pem")
        _wait_for(f"https://localhost:{tls_port}/health", context, process)

        # A second one cannot have the ports: it says so in one line.
        busy = subprocess.run(
            [*command, "--tls-port", str(free_port())],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert busy.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
