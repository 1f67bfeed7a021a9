"""`make run`'s embedded default: SQLite and a SQL broker, no server but our own processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.data import CALLER, KEY, TENANT
from tests.support.processes import ROOT, wait_until
from tests.support.services import free_port

BASE = f"/interact/version/3/account/{TENANT}/resources"
AUTH = {"Tenant-Id": TENANT, "Application-Key": KEY}


def _start_dev(
    workdir: Path, api_port: int, simulator_port: int, tls_port: int | None = None
) -> subprocess.Popen[bytes]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SMSD_") and name not in ("DATABASE_URL", "BROKER_URL")
    }
    # Only the ports move: the public and simulator URLs follow them.
    env.update(
        SMSD_API_PORT=str(api_port),
        SMSD_SIMULATOR_PORT=str(simulator_port),
        SMSD_SIMULATOR_TLS_PORT=str(tls_port or free_port()),
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "dev"],
        cwd=workdir,
        env=env,
        stdout=(workdir / "dev.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


def _stop(process: subprocess.Popen[bytes], signum: int = signal.SIGINT) -> int:
    process.send_signal(signum)  # SIGINT is what Ctrl-C sends; SIGTERM what service managers do
    return process.wait(timeout=40)


def _running_in(workdir: Path) -> list[int]:
    """Processes whose working directory is `workdir`: everything `dev` started."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cwd").resolve() == workdir.resolve():
                pids.append(int(entry.name))
        except OSError:
            continue  # gone already, or not ours to look at
    return pids


def test_dev_runs_the_whole_service_on_sqlite_and_survives_a_restart(tmp_path: Path) -> None:
    api_port, simulator_port, tls_port = free_port(), free_port(), free_port()
    base_url = f"http://127.0.0.1:{api_port}"
    dev = _start_dev(tmp_path, api_port, simulator_port, tls_port)
    try:
        wait_until(
            lambda: b"Ctrl-C stops everything" in (tmp_path / "dev.log").read_bytes(), 90, "dev"
        )
        api = httpx.Client(base_url=base_url, headers=AUTH, timeout=10)
        token = api.post(f"{BASE}/token", json={"callerId": CALLER}).json()["jpToken"]
        placed = api.post(
            f"{BASE}/campaign/sms/campaign1", json={"callerId": CALLER, "jpToken": token}
        )
        assert placed.status_code == 200
        assert placed.text.startswith("Placed campaign {campaign1} in SMS queue messageSid: SM")

        def sms_sent() -> bool:
            rows = api.get(f"{BASE}/reports/deflected-calls").json()
            return bool(rows and rows[0]["smsSent"] and rows[0]["smsDeliveredAt"])

        wait_until(sms_sent, 60, "smsSent in the report")

        # A bulk send takes the same path on SQLite and the SQL broker.
        rows = [{"callerId": CALLER}, {"callerId": "+972544696389"}, {"callerId": "nope"}]
        batch = api.post(f"{BASE}/campaign/sms/campaign1/bulk", json=rows)
        assert batch.status_code == 202, batch.text
        assert batch.json()["accepted"] == 2
        progress = f"{BASE}/campaign/sms/campaign1/bulk/{batch.json()['batchId']}"
        wait_until(
            lambda: api.get(progress).json()["delivered"] == 2, 60, "the bulk batch delivered"
        )
    finally:
        assert _stop(dev) == 0
    assert (tmp_path / "var" / "sms-dispatch.sqlite3").exists()

    # Running it again on the same files is safe: migrations and the demo seed are idempotent.
    again = _start_dev(tmp_path, api_port, simulator_port, tls_port)
    try:
        wait_until(
            lambda: (tmp_path / "dev.log").read_bytes().count(b"Ctrl-C stops everything") == 2,
            90,
            "dev to start again",
        )
        rows = httpx.get(f"{base_url}{BASE}/reports/deflected-calls", headers=AUTH).json()
        assert [row["jpToken"] for row in rows] == [token]
    finally:
        assert _stop(again, signal.SIGTERM) == 0
    wait_until(lambda: not _running_in(tmp_path), 10, "every process of dev to stop")


def test_dev_refuses_a_busy_port_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        dev = _start_dev(tmp_path, busy.getsockname()[1], free_port())
        assert dev.wait(timeout=30) != 0
    assert b"is already in use" in (tmp_path / "dev.log").read_bytes()
    assert not _running_in(tmp_path)
