"""The Litestar application (`uvicorn api.app:create_app --factory`)."""

from __future__ import annotations

import gc
from typing import Any

import anyio.to_thread
import structlog
from litestar import Litestar, Request
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.bulk import bulk_cancel, bulk_progress, bulk_send
from api.dependencies import dependencies
from api.errors import (
    database_error_response,
    http_error_response,
    refused_response,
    unexpected_response,
)
from api.fast_send import FastSend
from api.guard import KeyGuessingGuard, no_control_characters
from api.health import live, ready
from api.interact import (
    generate_token,
    get_interaction_link,
    notify_sms,
    send_sms,
    send_sms_to_caller,
    send_sms_v2,
)
from api.links import follow_short_link
from api.metrics import instrument, metrics
from api.soap import agent_wsdl, soap_endpoint
from api.tracking import deflected_call_report, get_message
from api.webhooks import WEBHOOKS
from shared.core.broker import RedisTaskQueue, create_celery
from shared.core.db import AsyncDatabase, Database
from shared.core.errors import RequestRefused
from shared.core.logging import configure_logging
from shared.core.settings import Settings, get_settings
from shared.messages.callback_groups import CallbackGroups
from shared.messages.group_commit import GroupAccept
from shared.messages.outbox import Publisher, QueuePublisher
from shared.text.phone import NumberPool


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the API for `settings` (the environment's by default)."""
    settings = settings or get_settings()
    configure_logging(settings)
    # A request waits only briefly for a pooled connection, then answers 503.
    db = Database(settings, pool_timeout=settings.api_database_pool_timeout)
    # Send requests are accepted on the event loop, in groups (shared/messages/group_commit.py),
    # whose transactions also mark what the publisher published.
    async_db = AsyncDatabase(
        settings, db.config_cache, pool_timeout=settings.api_database_pool_timeout
    )
    celery = create_celery(settings)
    # On Redis the tasks go straight onto its queue from the event loop; otherwise (the
    # embedded SQL broker, RabbitMQ) through Celery's producer on a thread.
    publisher: Publisher | QueuePublisher = (
        QueuePublisher(
            RedisTaskQueue(settings),
            lambda *marked: groups.note_published(*marked),
            window=settings.publish_window.total_seconds(),
            batch_size=settings.send_batch_size,
        )
        if RedisTaskQueue.wanted(settings)
        else Publisher(
            celery,
            db,
            mark=lambda *marked: groups.note_published(*marked),
            window=settings.publish_window.total_seconds(),
            batch_size=settings.send_batch_size,
        )
    )
    groups = GroupAccept(async_db, settings, publisher.submit)
    guard = KeyGuessingGuard(settings)
    # Provider callbacks, applied in groups on the same engine (shared/messages/callback_groups.py).
    callbacks = CallbackGroups(async_db, settings)
    # Bulk requests' numbers are validated in these processes (started on the first one).
    numbers = NumberPool(settings.bulk_validation_processes)

    async def before_request(request: Request[Any, Any, Any]) -> None:
        # Async, though it awaits nothing: Litestar runs a plain function hook on a thread.
        structlog.contextvars.clear_contextvars()
        no_control_characters(request)

    async def shutdown() -> None:
        await guard.close()
        await groups.close()
        await callbacks.close()
        await async_db.dispose()
        if isinstance(publisher, QueuePublisher):
            await publisher.close()
        else:
            # Publishes what is still waiting: a blocking join, so off the event loop.
            await anyio.to_thread.run_sync(publisher.close)
        db.dispose()
        numbers.close()

    app = Litestar(
        route_handlers=[
            send_sms,
            send_sms_to_caller,
            send_sms_v2,
            bulk_send,
            bulk_progress,
            bulk_cancel,
            notify_sms,
            get_interaction_link,
            follow_short_link,
            agent_wsdl,
            soap_endpoint,
            generate_token,
            get_message,
            deflected_call_report,
            *WEBHOOKS,
            live,
            ready,
            metrics,
        ],
        # What handlers take as parameters (api/dependencies.py): services, never a locator.
        dependencies=dependencies(settings, db, celery, groups, callbacks, numbers),
        before_request=before_request,
        on_startup=[guard.start, _freeze_startup_objects],
        on_shutdown=[shutdown],
        middleware=[guard.middleware],
        # Checked as the body arrives (and against Content-Length before): never buffered whole.
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={
            RequestRefused: refused_response,
            HTTPException: http_error_response,
            DBAPIError: database_error_response,
            PoolTimeout: database_error_response,
            Exception: unexpected_response,
        },
        openapi_config=OpenAPIConfig(
            title="sms-dispatch",
            version="1.0.0",
            description=(
                "The Interact Send SMS API (version 3), queued: every 200 is a message already "
                "recorded in the database; workers send it through a provider shortly after."
            ),
            path="/schema",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin()],
        ),
        logging_config=None,
    )
    # The lean route for v3 sends (api/fast_send.py), unless the route has grown something it
    # does not repeat.
    if settings.lean_send:
        lean = FastSend(app.asgi_handler, app, groups, guard)
        reason = lean.unfit(before_request)
        if reason is None:
            app.asgi_handler = lean
        else:
            structlog.get_logger(__name__).warning("api.lean_send_off", reason=reason)
    instrument(app, send_handlers=[send_sms, send_sms_to_caller, send_sms_v2, soap_endpoint])
    return app


async def _freeze_startup_objects() -> None:
    # What exists once the app has started (modules, routes, SQLAlchemy's and Litestar's
    # caches) lives as long as the process: out of the collector's way, so its full
    # collections under load stop walking it (shorter pauses, so a lower accept p99).
    gc.freeze()
