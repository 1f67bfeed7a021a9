"""How refusals look on the wire: the seed's texts, statuses and the 401 header and body."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.guard import note_auth_failure
from shared.errors import (
    MORE_INFO_URL,
    UNAUTHORIZED_CODE,
    UNAUTHORIZED_MESSAGE,
    RequestRefused,
    Unauthenticated,
)

log = structlog.get_logger(__name__)

UNAUTHORIZED_BODY = msgspec.json.encode(
    {"code": UNAUTHORIZED_CODE, "message": UNAUTHORIZED_MESSAGE, "moreInfoUrl": MORE_INFO_URL}
)


def log_refusal(request: Request[Any, Any, Any], exc: RequestRefused) -> None:
    log.info(
        "request.refused",
        status=exc.status_code,
        reason=exc.detail,
        path=request.url.path,
        tenant=request.headers.get("tenant-id"),
    )


def refused_response(request: Request[Any, Any, Any], exc: RequestRefused) -> Response[bytes]:
    """A documented refusal: plain text, except the 401 which is JSON plus its reason header."""
    log_refusal(request, exc)
    if isinstance(exc, Unauthenticated):
        note_auth_failure(request.scope)
        return Response(
            content=UNAUTHORIZED_BODY,
            status_code=401,
            media_type=MediaType.JSON,
            headers={"Unauthenticated-Reason": exc.reason},
        )
    return Response(
        content=exc.text.encode(), status_code=exc.status_code, media_type=MediaType.TEXT
    )


def http_error_response(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Framework errors (unknown route, wrong method, body too large) as short plain text."""
    detail = str(exc.detail)
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        limit = request.route_handler.resolve_request_max_body_size()
        detail = f"request body too large: at most {limit} bytes"
        log.warning("request.body_too_large", path=request.url.path, limit=limit)
    return Response(
        content=detail.encode(),
        status_code=exc.status_code,
        media_type=MediaType.TEXT,
        headers=exc.headers,
    )


def unexpected_response(_request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The seed's 500 `exception`: the traceback goes to the log, never to the caller."""
    log.error("request.failed", exc_info=exc)
    return Response(content=b"exception", status_code=500, media_type=MediaType.TEXT)


SERVICE_UNAVAILABLE = b"service unavailable"


def database_unavailable(exc: BaseException) -> bool:
    """The database is down, unreachable, saturated or too slow (a pool wait, a connection
    error, a statement timeout, the API's accept deadline): retrying later may succeed."""
    if isinstance(exc, PoolTimeout | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_error_response(
    request: Request[Any, Any, Any], exc: DBAPIError | PoolTimeout
) -> Response[bytes]:
    """The database is down, unreachable or saturated: 503 at once, so callers retry later.

    Nothing was accepted (the transaction never committed), except when the API's accept
    deadline passed while a COMMIT was in flight: a retry with the same Idempotency-Key then
    answers the original messageSid. Other database errors are bugs and stay the seed's 500
    `exception`."""
    if not database_unavailable(exc):
        return unexpected_response(request, exc)
    cause = getattr(exc, "orig", None) or exc
    log.warning(
        "request.database_unavailable",
        path=request.url.path,
        error=type(cause).__name__,
        detail=next(iter(str(cause).strip().splitlines()), ""),
    )
    return Response(content=SERVICE_UNAVAILABLE, status_code=503, media_type=MediaType.TEXT)
