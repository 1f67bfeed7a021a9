"""`sms-dispatch flower`: Flower on the configured broker, behind basic auth, showing each send
task with its messageSid as a readable argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from tests.support.api import V3
from tests.support.data import CALLER, Demo, headers
from tests.support.processes import Process, wait_until
from tests.support.services import free_port

AUTH = ("ops", "s3cret-flower")


def _tasks(base: str) -> dict[str, dict[str, Any]]:
    try:
        response = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=5)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    found: dict[str, dict[str, Any]] = response.json()
    return found


def test_flower_shows_send_tasks_with_their_sid_behind_basic_auth(
    api_url: str,
    demo: Demo,
    simulator: httpx.Client,
    spawn: Callable[..., Process],
    start_worker: Callable[..., Process],
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower = spawn(
        "flower",
        "flower",
        "--port",
        str(port),
        env={"SMSD_FLOWER_BASIC_AUTH": ":".join(AUTH)},
    )
    try:
        wait_until(lambda: _reachable(base), 60, "Flower")
        start_worker()
        api = httpx.Client(base_url=api_url, timeout=10)
        token = api.post(f"{V3}/token", headers=headers(), json={"callerId": CALLER}).json()
        sids: list[str] = []

        def shown() -> bool:
            # Flower only sees what happens after it subscribed to events: send until it shows.
            response = api.post(
                f"{V3}/campaign/sms/campaign1",
                headers=headers(Accept="application/json"),
                json={"callerId": CALLER, "jpToken": token["jpToken"]},
            )
            sids.append(response.json()["messageSid"])
            return any(
                task.get("name") == "sms.send" and task.get("state") == "SUCCESS"
                for task in _tasks(base).values()
            )

        wait_until(shown, 60, "Flower to show a finished send task")
        tasks = _tasks(base)
        anonymous = httpx.get(f"{base}/api/tasks", timeout=5)
        page = httpx.get(f"{base}/tasks", timeout=5)
    finally:
        flower.stop()

    assert anonymous.status_code == 401
    assert page.status_code == 401
    send_tasks = [t for t in tasks.values() if t.get("name") == "sms.send"]
    assert send_tasks
    for task in send_tasks:
        # The only argument is the messageSid, shown as written: no pickled blob.
        assert task["args"] in {f"['{sid}']" for sid in sids}, task["args"]
        assert task["kwargs"] == "{}"


def _reachable(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
