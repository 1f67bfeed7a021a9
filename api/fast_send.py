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
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.body import JsonBody
from api.guard import KeyGuessingGuard, may_hold_control_characters
from api.interact import placed_response, send_command, wants_json
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
        self, app: ASGIApp, litestar: Litestar, groups: GroupAccept, guard: KeyGuessingGuard
    ) -> None:
        self.app = app
        self.litestar = litestar
        self.groups = groups
        self.guard = guard
        # The route's own handler and template, as the router gives them, so metrics, the
        # guard and the error answers see what the route would show.
        _, handler, _, _, self.path_template = litestar.asgi_router.handle_routing(
            path="/interact/version/3/account/a/resources/campaign/sms/c", method="POST"
        )
        if not isinstance(handler, HTTPRouteHandler):
            raise TypeError(f"the v3 send path is routed to {handler!r}")
        self.route_handler = handler
        limit = handler.resolve_request_max_body_size()
        if limit is None:
            raise TypeError("the v3 send route has no body limit")
        self.max_body_bytes = limit
        self.handlers: Mapping[Any, ExceptionHandler] = (
            self.route_handler.resolve_exception_handlers()
        )
        self.encoders = self.route_handler.resolve_type_encoders()
        # Requests this route answered (the rest went to Litestar's): what the tests look at.
        self.answered = 0

    def unfit(self, before_request: object) -> str | None:
        """Why the lean route would not do all the Litestar route does (None: it would). It
        repeats the route's hook, middleware and limits, so anything added to the route or the
        app later that it does not know turns it off (api/app.py) rather than being skipped."""
        handler, app = self.route_handler, self.litestar
        if handler.resolve_middleware() != [self.guard.middleware]:
            return "the route has middleware besides the key-guessing guard"
        if handler.resolve_guards() or any(
            layer.after_request for layer in handler.ownership_layers
        ):
            return "the route has guards or an after_request hook"
        if handler.resolve_response_headers() or handler.resolve_response_cookies():
            return "the route adds response headers or cookies"
        if handler.resolve_after_response() or app.before_send or app.after_exception:
            return "the app has after_response, before_send or after_exception hooks"
        if handler.resolve_before_request() is None or app.before_request is not before_request:
            return "the route's before_request hook is not the one the lean route repeats"
        if app.cors_config or app.compression_config or app.allowed_hosts or app.csrf_config:
            return "the app has CORS, compression, allowed hosts or CSRF configured"
        return None

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
            or not self._routed_here(scope["path"])
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
        started = False
        counting = self.guard.counting(scope, address, send)

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await counting(message)

        try:
            await self._send(scope, receive, tracked, match, headers)
        except Exception as exc:
            # As Litestar's exception middleware does: answered by the handler for it, unless
            # the answer had begun (then the server ends the connection, as it would there).
            if started:
                raise
            try:
                await self._answer_error(scope, receive, tracked, exc)
            except Exception as again:
                if started:
                    raise
                # The handler itself failed: the app's handler of last resort (500 exception).
                await self._answer_error(scope, receive, tracked, again, last_resort=True)

    def _routed_here(self, path: str) -> bool:
        """Whether the router sends `path` to the v3 send route: a fixed segment of another
        route (`…/campaign/sms/notify`) is not a campaign id. The router caches its answers."""
        try:
            return self.litestar.asgi_router.handle_routing(path=path, method="POST")[1] is (
                self.route_handler
            )
        except Exception:  # no route, or only another method's: the router answers it
            return False

    async def _send(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        match: re.Match[str],
        headers: dict[bytes, bytes],
    ) -> None:
        as_json = b"accept" in headers and wants_json(Request(scope, receive, send))
        body = await _body(receive, self.max_body_bytes)
        if body is None:
            return  # the client went away before its body arrived: nothing to answer
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
        if accepted.replayed or as_json:
            # JSON asked for, or a replay's header: the route's own response object.
            response = placed_response(accepted, as_json=as_json)
            await self._respond(scope, receive, send, response)
            return
        await _placed_text(send, accepted)

    async def _answer_error(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exc: Exception,
        *,
        last_resort: bool = False,
    ) -> None:
        """As Litestar's exception middleware answers: the handler registered for the nearest
        class in the exception's MRO (the app registers one for Exception itself)."""
        kind = (
            Exception if last_resort else next(c for c in type(exc).__mro__ if c in self.handlers)
        )
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        await self._respond(scope, receive, send, self.handlers[kind](request, exc))

    async def _respond(
        self, scope: Scope, receive: Receive, send: Send, response: Response[Any]
    ) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        asgi = response.to_asgi_response(None, request, type_encoders=self.encoders)
        await asgi(scope, receive, send)


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


async def _body(receive: Receive, limit: int) -> bytes | None:
    """The body, held to `limit` whatever the server lets through (Litestar's answer if not)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
