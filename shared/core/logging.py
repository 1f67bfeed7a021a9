"""structlog set-up: JSON lines in production, coloured console output in a terminal."""

from __future__ import annotations

import logging
import sys
import threading

import msgspec
import structlog

from shared.core.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Route structlog and stdlib logging (uvicorn, celery, alembic) through one renderer."""
    as_json = settings.log_json if settings.log_json is not None else not sys.stderr.isatty()
    shared_processors: list[structlog.types.Processor] = [
        # Context bound with bound_contextvars (messageSid, account, campaign) lands on every line.
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_json)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    # No line shows the caller's file, thread or process, so stdlib logging need not find
    # them out for every record (the "Optimization" section of the logging HOWTO): with the
    # JSON encoder below, a line costs half what it did, and the accept path logs one per
    # message.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Our own lines skip stdlib logging (a LogRecord, the handler's lock, a second pass
    # through the formatter): structlog renders them and writes them straight to stderr, a
    # third of what a line cost through logging, and the accept path, the worker and every
    # callback write one per message. Other libraries' lines (uvicorn, Celery) still come
    # through logging, rendered by the same processors. A logger keeps the level and renderer
    # it found at its first line (cache_logger_on_first_use): configure once per process, as
    # every entry point does, before anything logs.
    structlog.configure(
        processors=[
            *shared_processors,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if as_json else _keep,
            renderer,
        ],
        logger_factory=_StderrLogger,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(settings.log_level.upper())
        ),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else _keep,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Our own message.* lines say what happened to each message; Celery's per-task
    # received/succeeded lines and beat's every-tick line only repeat it, and the Twilio SDK's
    # clients log every request and answer in about ten lines (errors still show).
    for noisy in (
        "httpx",
        "httpcore",
        "celery.app.trace",
        "celery.worker.strategy",
        "celery.beat",
        "twilio.http_client",
        "twilio.async_http_client",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_ENCODER = msgspec.json.Encoder(enc_hook=str)


def _json(event_dict: object, **_options: object) -> str:
    # msgspec instead of json.dumps: a third of a log line's cost. Whatever it cannot
    # encode (an exception object, a UUID) is written as its str().
    return _ENCODER.encode(event_dict).decode()


def _keep(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    # The console renderer prints exc_info itself, prettier than format_exc_info would.
    return event_dict


_WRITE = threading.Lock()


class _StderrLogger:
    """What structlog hands a rendered line to: stderr as it is now (a test runner or a
    daemon may have replaced it since start-up), one whole line at a time across threads.
    `name` is the logger's, for add_logger_name."""

    def __init__(self, name: str = "", *_args: object) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        with _WRITE:
            sys.stderr.write(message + "\n")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg
