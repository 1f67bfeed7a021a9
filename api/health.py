"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import anyio.to_thread
from litestar import MediaType, Request, Response, get
from litestar.datastructures import State
from sqlalchemy import text as sql

from api.openapi import documented, text
from api.placement import Placement


@get("/health/live", media_type=MediaType.TEXT, tags=["Health"], summary="Liveness")
async def live() -> str:
    return "ok"


@get(
    "/health/ready",
    media_type=MediaType.TEXT,
    tags=["Health"],
    summary="Readiness",
    operation_class=documented(
        errors={503: text("The database does not answer", "database unavailable: OperationalError")}
    ),
)
async def ready(request: Request[object, object, State]) -> Response[str]:
    """Ready when the database answers: without it nothing can be accepted."""
    placement: Placement = request.app.state.placement

    def check() -> None:
        with placement.db.engine.connect() as connection:
            connection.execute(sql("SELECT 1"))

    try:
        await anyio.to_thread.run_sync(check)
    except Exception as exc:
        return Response(f"database unavailable: {type(exc).__name__}", status_code=503)
    return Response("ok")
