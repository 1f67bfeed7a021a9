"""Scale-out and rolling restarts on a real broker: two API processes and two workers share the
load, and restarting each of them under a steady stream of sends fails no request and loses or
doubles no message. Run on Redis and on RabbitMQ."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import select

from shared.core.db import Database
from shared.core.models import Message
from tests.support.data import CALLER, TENANT, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.services import free_port, rabbitmq_server

SEND = f"/interact/version/3/account/{TENANT}/resources/campaign/sms/campaign1"


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    if request.param == "redis":
        yield redis_url
        return
    with rabbitmq_server() as url:
        yield url


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _answering(port: int) -> Callable[[], bool]:
    return lambda: _ready(port)


class Stream:
    """A steady stream of sends, spread over the API processes as a load balancer would:
    a backend that refuses the connection (restarting) is skipped for the other one."""

    def __init__(self, ports: list[int], token: str) -> None:
        self.ports = ports
        self.token = token
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            self.answers.append(self._send(turn))
            turn += 1
            time.sleep(0.02)

    def _send(self, turn: int) -> tuple[int, str]:
        for attempt in range(20):
            port = self.ports[(turn + attempt) % len(self.ports)]
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}{SEND}",
                    headers=headers(Accept="application/json"),
                    json={"callerId": CALLER, "jpToken": self.token},
                    timeout=30,
                )
            except httpx.ConnectError:
                time.sleep(0.05)  # not listening (restarting): a balancer tries the next one
                continue
            sid = response.json()["messageSid"] if response.status_code == 200 else ""
            return response.status_code, sid
        return 0, ""


def _worker_sends(process: Process) -> int:
    lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    return sum(
        1
        for line in lines
        if line.get("event") == "message.status"
        and line.get("source") == "worker"
        and line.get("status") == "sent"
    )


def _api_accepts(process: Process) -> int:
    lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    return sum(1 for line in lines if line.get("event") == "message.accepted")


def test_apis_and_workers_share_the_load_and_restart_one_by_one_without_loss(
    broker_url: str,
    api_url: str,
    demo: Demo,
    db: Database,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    env = {"SMSD_BROKER_URL": broker_url}
    ports = [free_port(), free_port()]
    apis = [spawn("api", "api", "--port", str(port), env=env) for port in ports]
    for port in ports:
        wait_until(_answering(port), 30, f"the API on {port}")
    workers = [start_worker(env=env), start_worker(env=env, beat=False)]
    token = httpx.post(
        f"{api_url}/interact/version/3/account/{TENANT}/resources/token",
        headers=headers(),
        json={"callerId": CALLER},
    ).json()["jpToken"]
    retired: list[Process] = []

    with Stream(ports, token) as stream:
        time.sleep(2)
        for index, port in enumerate(ports):  # a rolling deploy of the API...
            apis[index].stop()
            retired.append(apis[index])
            apis[index] = spawn("api", "api", "--port", str(port), env=env)
            wait_until(_answering(port), 30, f"the API on {port} again")
            time.sleep(1)
        for index in range(len(workers)):  # ...then of the workers
            workers[index].stop()
            retired.append(workers[index])
            workers[index] = start_worker(env=env, beat=index == 0)
            time.sleep(1)
        time.sleep(1)

    codes = Counter(code for code, _ in stream.answers)
    assert codes == Counter({200: len(stream.answers)}), codes
    sids = [sid for _, sid in stream.answers]

    def all_delivered() -> bool:
        with db.transaction() as session:
            statuses = Counter(session.scalars(select(Message.status)))
        return statuses == Counter({"delivered": len(sids)})

    wait_until(all_delivered, 90, "every accepted message delivered")
    per_sid = Counter(m["idempotencyKey"] for m in simulator.get("/messages").json())
    assert per_sid == Counter(dict.fromkeys(sids, 1))  # none lost, none twice
    # Both API processes and both workers took part (first generation, before the restarts).
    first_apis = [p for p in retired if p.name == "api"]
    first_workers = [p for p in retired if p.name == "worker"]
    assert all(_api_accepts(p) > 0 for p in first_apis)
    assert all(_worker_sends(p) > 0 for p in first_workers)
