"""What a request may cost before authentication is bounded, in a real `sms-dispatch api`."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.data import CALLER, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.services import free_port

V3 = "/interact/version/3/account/12345678/resources"
MB = 1024 * 1024
CHUNK = 64 * 1024


def start_api(spawn: Callable[..., Process], **env: str) -> tuple[Process, str]:
    port = free_port()
    process = spawn("api-limits", "api", env={"SMSD_API_PORT": str(port), **env})
    base = f"http://127.0.0.1:{port}"

    def live() -> bool:
        try:
            return httpx.get(f"{base}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(live, 30, "the API")
    return process, base


@pytest.fixture
def api(spawn: Callable[..., Process]) -> Iterator[tuple[Process, str]]:
    process, base = start_api(spawn, SMSD_HEADER_TIMEOUT="2")
    yield process, base
    process.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(base: str, head: bytes, chunks: Iterable[bytes], pause: float = 0) -> int | None:
    """Sends `head` then `chunks`; the status answered, or None when the server closed first."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # closed on us: read whatever answer came before
        try:
            reply = sock.recv(4096)
        except OSError:
            return None
    return int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else None


def huge_form_body(base: str) -> int | None:
    size = 10 * MB
    head = (
        b"POST /callbacks/twilio HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    return raw_request(base, head, (b"a=" + b"b" * (CHUNK - 2) for _ in range(size // CHUNK)))


def huge_chunked_json(base: str) -> int | None:
    """No Content-Length to refuse up front: the limit has to hold while reading."""
    head = (
        f"POST {V3}/campaign/sms/campaign1 HTTP/1.1\r\nHost: x\r\n"
        "Tenant-Id: 12345678\r\nApplication-Key: 53736e07e4b05772e6475c2d\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (CHUNK, b" " * CHUNK)
    return raw_request(base, head, [chunk] * (10 * MB // CHUNK) + [b"0\r\n\r\n"])


def huge_header(base: str) -> int | None:
    head = f"GET {V3}/reports/deflected-calls HTTP/1.1\r\nHost: x\r\nX-Big: ".encode()
    return raw_request(base, head, (b"a" * CHUNK for _ in range(50 * MB // CHUNK)), pause=0.002)


def test_huge_bodies_and_headers_are_refused_without_delaying_a_send_or_growing_memory(
    api: tuple[Process, str], demo: Demo
) -> None:
    process, base = api
    with httpx.Client(base_url=base, headers=headers(), timeout=30) as client:

        def send() -> float:
            token = client.post(f"{V3}/token", json={"callerId": CALLER}).json()["jpToken"]
            started = time.perf_counter()
            response = client.post(
                f"{V3}/campaign/sms/campaign1", json={"callerId": CALLER, "jpToken": token}
            )
            assert response.status_code == 200, response.text
            return time.perf_counter() - started

        for _ in range(20):  # warm: imports, pools and caches are all in place
            send()
        before = rss_kib(process.popen.pid)
        quiet = max(send() for _ in range(5))

        results: dict[str, int | None] = {}
        attacks = [huge_form_body, huge_chunked_json, huge_header]
        threads = [
            threading.Thread(target=lambda a=a: results.__setitem__(a.__name__, a(base)))
            for a in attacks
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        under_attack = max(send() for _ in range(5))
        for thread in threads:
            thread.join(60)
        after = rss_kib(process.popen.pid)

    print(
        f"send quiet {quiet * 1000:.1f} ms, under attack {under_attack * 1000:.1f} ms; "
        f"RSS {before} KiB -> {after} KiB; answers {results}"
    )
    assert results["huge_form_body"] in (413, None)
    assert results["huge_chunked_json"] in (413, None)
    assert results["huge_header"] in (431, None)
    assert under_attack < 2.0  # a send takes milliseconds; a buffered 50 MB would take seconds
    assert after - before < 8 * 1024  # the attacks sent 70 MB


def test_a_body_over_the_limit_is_413_with_a_clear_text(
    api: tuple[Process, str], demo: Demo
) -> None:
    _process, base = api
    response = httpx.post(
        f"{base}{V3}/token", headers=headers(), content=b" " * (64 * 1024 + 1), timeout=10
    )

    assert (response.status_code, response.text) == (
        413,
        "request body too large: at most 65536 bytes",
    )


def test_headers_over_the_limit_are_431(api: tuple[Process, str]) -> None:
    _process, base = api
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n"

    assert raw_request(base, head, []) == 431
    # Just under the limit is served as usual.
    assert raw_request(base, head.replace(b"a" * 17_000, b"a" * 15_000), []) == 200


def test_headers_that_never_end_are_cut_off(api: tuple[Process, str]) -> None:
    _process, base = api
    started = time.monotonic()

    answer = raw_request(
        base, b"GET /health/live HTTP/1.1\r\n", (b"X: y\r\n" for _ in range(20)), 0.5
    )

    assert answer in (408, None)
    assert time.monotonic() - started < 8  # SMSD_HEADER_TIMEOUT is 2 s here


def test_connections_past_the_cap_are_answered_503(spawn: Callable[..., Process]) -> None:
    process, base = start_api(spawn, SMSD_API_MAX_CONNECTIONS="3")
    host, port = base.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        time.sleep(0.2)
        assert raw_request(base, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n", []) == 503
    finally:
        for sock in idle:
            sock.close()
        process.stop()
