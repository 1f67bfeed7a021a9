"""The lean route for Send SMS v3, the request high-volume callers make thousands of times a
second: answered in front of Litestar's router, signature model, dependency injection and
response objects, which cost a send more CPU than the rest of its HTTP handling together.

Only an ordinary request takes it: the v3 send path exactly, a declared body within the limit,
no control character anywhere the `before_request` hook looks, an unblocked address, each
header it reads at most once and a Host the router accepts. Anything else goes to the Litestar
route, untouched (nothing was read yet), and is answered there as before. A request that takes
it gets what the route would have answered: the same command (`send_command`), the same group
commit, the same success text, and for a refusal or an error the response of the app's own
exception handler. `tests/api/test_fast_send.py` holds the two routes' answers side by side."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar._asgi.utils import is_valid_host
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from api.body import JsonBody
from api.guard import KeyGuessingGuard, may_hold_control_characters
from api.interact import placed_response, send_command
from shared.messages.accept import AcceptedMessage
from shared.messages.group_commit import GroupAccept

# The route `api.interact.send_sms` serves, as uvicorn gives the path (already percent-decoded).
SEND_PATH = re.compile(r"/interact/version/3/account/([^/]+)/resources/campaign/sms/([^/]+)")

# The request headers the lean route reads; one sent twice goes to the Litestar route.
_READ = frozenset(
    {
        b"tenant-id",
        b"application-key",
        b"environment-name",
        b"idempotency-key",
        b"accept",
        b"host",
        b"content-length",
        b"transfer-encoding",
    }
)
_TEXT = b"text/plain; charset=utf-8"

ExceptionHandler = Callable[[Request[Any, Any, Any], Any], Response[Any]]


class FastSend:
    """ASGI wrapper around Litestar's handler: Send SMS v3 requests it can answer exactly, it
    answers; everything else passes through."""

    def __init__(
        self,
        app: ASGIApp,
        litestar: Litestar,
        groups: GroupAccept,
        guard: KeyGuessingGuard,
        route_handler: Any,
        path_template: str,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.litestar = litestar
        self.groups = groups
        self.guard = guard
        self.route_handler = route_handler
        self.path_template = path_template
        self.max_body_bytes = max_body_bytes
        self.handlers: Mapping[Any, ExceptionHandler] = litestar.exception_handlers
        # Requests this route answered (the rest went to Litestar's): what the tests look at.
        self.answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != ScopeType.HTTP
            or scope.get("method") != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        match = SEND_PATH.fullmatch(scope["path"])
        headers = _headers(scope) if match is not None else None
        if (
            match is None
            or headers is None
            or b"transfer-encoding" in headers
            or not 0 <= _length(headers.get(b"content-length")) <= self.max_body_bytes
            or not is_valid_host(headers.get(b"host", b""))
            or may_hold_control_characters(scope)
        ):
            await self.app(scope, receive, send)
            return
        address = self.guard.address.of(scope)
        if self.guard.blocks.left(address) > 0:
            await self.app(scope, receive, send)  # answered 429 there
            return
        self.answered += 1
        structlog.contextvars.clear_contextvars()
        scope["route_handler"] = self.route_handler
        scope["path_template"] = self.path_template
        scope["path_params"] = {"account_id": match[1], "campaign_id": match[2]}
        send = self.guard.counting(scope, address, send)
        body = await _body(receive)
        if body is None:
            return  # the client went away before its body arrived: nothing to answer
        try:
            command = send_command(
                JsonBody(body),
                match[1],
                match[2],
                _text(headers.get(b"tenant-id")),
                _text(headers.get(b"application-key")),
                _text(headers.get(b"environment-name")),
                region=self.groups.settings.default_region,
                idempotency_key=_text(headers.get(b"idempotency-key")),
            )
            accepted = await self.groups.send(command)
        except Exception as exc:
            await self._answer_error(scope, receive, send, exc)
            return
        if accepted.replayed or headers.get(b"accept", b"*/*") != b"*/*":
            # JSON asked for, or a replay's header: the route's own response object.
            await self._respond(scope, receive, send, lambda r: placed_response(r, accepted))
            return
        await _placed_text(send, accepted)

    async def _answer_error(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """As Litestar's exception middleware answers: the handler registered for the nearest
        class in the exception's MRO (the app registers one for Exception itself)."""
        handler = next(cls for cls in type(exc).__mro__ if cls in self.handlers)
        await self._respond(scope, receive, send, lambda r: self.handlers[handler](r, exc))

    async def _respond(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        build: Callable[[Request[Any, Any, Any]], Response[Any]],
    ) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        response = build(request)
        encoders = self.route_handler.resolve_type_encoders()
        await response.to_asgi_response(None, request, type_encoders=encoders)(scope, receive, send)


async def _placed_text(send: Send, accepted: AcceptedMessage) -> None:
    """What `placed_response` answers most callers (no Accept, or */*), written directly."""
    body = (
        f"Placed campaign {{{accepted.campaign_id}}} in SMS queue messageSid: {accepted.sid}"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", _TEXT), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _headers(scope: Scope) -> dict[bytes, bytes] | None:
    """The headers the lean route reads, or None if one of them came twice."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _READ:
            if name in found:
                return None
            found[name] = value
    return found


def _length(value: bytes | None) -> int:
    if value is None or not value.isdigit():
        return -1
    return int(value)


def _text(value: bytes | None) -> str | None:
    # As Litestar reads a header: latin-1.
    return None if value is None else value.decode("latin-1")


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
