"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.to_thread
import redis
from celery import Celery
from litestar import MediaType, Response, get
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.dependencies import CeleryDep, DatabaseDep, SettingsDep
from api.openapi import documented, text

# Each dependency gets this long to answer, checked side by side: a probe never hangs.
CHECK_TIMEOUT = 3.0
BROKER_TIMEOUT = 1.0


@get("/health/live", media_type=MediaType.TEXT, tags=["Health"], summary="Liveness")
async def live() -> str:
    return "ok"


@get(
    "/health/ready",
    media_type=MediaType.TEXT,
    tags=["Health"],
    summary="Readiness",
    operation_class=documented(
        errors={
            503: text(
                "The database or the broker does not answer (each is given a few seconds)",
                "database unavailable: OperationalError; broker unavailable: ConnectionError",
            )
        }
    ),
)
async def ready(database: DatabaseDep, settings: SettingsDep, celery: CeleryDep) -> Response[str]:
    """Ready when the database and the broker both answer.

    Without the database nothing can be accepted; without the broker accepted messages wait
    for the sweeper, so this instance should not take new traffic until it is back."""
    checks: dict[str, Callable[[], None]] = {
        "database": database.ping,
        "broker": lambda: check_broker(settings.broker_url, celery),
    }
    problems: dict[str, str] = {}

    async def run(name: str, check: Callable[[], None]) -> None:
        problem = await _probe(check)
        if problem is not None:
            problems[name] = problem

    async with anyio.create_task_group() as group:
        for name, check in checks.items():
            group.start_soon(run, name, check)
    if problems:
        return Response(
            "; ".join(
                f"{name} unavailable: {problems[name]}" for name in checks if name in problems
            ),
            status_code=503,
        )
    return Response("ok")


async def _probe(check: Callable[[], None]) -> str | None:
    """None when `check` passed; otherwise why not (a thread left hanging is abandoned)."""
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:
        return type(exc).__name__
    return None


def check_broker(broker_url: str, celery: Celery) -> None:
    """PING a Redis broker within a second; any other broker: one connection attempt."""
    if broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(
            broker_url,
            socket_connect_timeout=BROKER_TIMEOUT,
            socket_timeout=BROKER_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
