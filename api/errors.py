"""How refusals look on the wire: the seed's HTTP status of each refusal (`REFUSAL_STATUSES`,
the one place a domain error meets a status code, for REST and SOAP alike), the REST texts, the
401 header and body, and the answers to framework and database errors."""

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
from shared.core.errors import (
    MORE_INFO_URL,
    UNAUTHORIZED_CODE,
    UNAUTHORIZED_MESSAGE,
    BatchNotFound,
    BodyTooLarge,
    CampaignNotFound,
    IdempotencyConflict,
    InvalidParameter,
    MessageNotFound,
    ProviderNotDefined,
    RequestRefused,
    TokenExpired,
    TooManyRecipients,
    Unauthenticated,
)

log = structlog.get_logger(__name__)

UNAUTHORIZED_BODY = msgspec.json.encode(
    {"code": UNAUTHORIZED_CODE, "message": UNAUTHORIZED_MESSAGE, "moreInfoUrl": MORE_INFO_URL}
)


# The seed's response table: each refusal's HTTP status. SOAP answers its refusals in its own
# envelope (api/soap.py) but logs them with these statuses too.
REFUSAL_STATUSES: dict[type[RequestRefused], int] = {
    InvalidParameter: 400,
    Unauthenticated: 401,
    TokenExpired: 403,
    CampaignNotFound: 404,
    MessageNotFound: 404,
    BatchNotFound: 404,
    TooManyRecipients: 413,
    BodyTooLarge: 413,
    IdempotencyConflict: 422,
    ProviderNotDefined: 500,
}


def refusal_status(exc: RequestRefused) -> int:
    """The HTTP status of a refusal (its nearest mapped class decides; otherwise 500)."""
    for cls in type(exc).__mro__:
        status = REFUSAL_STATUSES.get(cls)
        if status is not None:
            return status
    return 500


def note_refusal(request: Request[Any, Any, Any], exc: RequestRefused) -> None:
    """Log a refusal, and count missing or wrong credentials against the caller's address
    (api/guard.py): the same for REST and SOAP."""
    log.info(
        "request.refused",
        status=refusal_status(exc),
        reason=exc.detail,
        path=request.url.path,
        tenant=request.headers.get("tenant-id"),
    )
    if isinstance(exc, Unauthenticated):
        note_auth_failure(request.scope)


def refused_response(request: Request[Any, Any, Any], exc: RequestRefused) -> Response[bytes]:
    """A documented refusal: plain text, except the 401 which is JSON plus its reason header."""
    note_refusal(request, exc)
    if isinstance(exc, Unauthenticated):
        return Response(
            content=UNAUTHORIZED_BODY,
            status_code=401,
            media_type=MediaType.JSON,
            headers={"Unauthenticated-Reason": exc.reason},
        )
    return Response(
        content=exc.text.encode(), status_code=refusal_status(exc), media_type=MediaType.TEXT
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
