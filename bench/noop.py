"""The dispatch floor: a Celery app whose one task does nothing, on the same broker and with the
same worker settings as the send task (threads pool, prefetch, acks_late, logging; task events
as SMSD_TASK_EVENTS says, off by default).

    celery -A bench.noop worker -Q bench.noop -P threads --without-mingle --without-gossip -c N
"""

from __future__ import annotations

from typing import Any

from celery import Celery

# The service worker's process hooks (logging at SMSD_LOG_LEVEL, which also makes the worker log
# `ready`, the provider imports at start, the task context), as in a real worker: importing
# the module connects them. Its own app is not the one `-A bench.noop` runs.
import worker.celery_app  # noqa: F401
from shared.core.broker import celery_config
from shared.core.settings import get_settings

NOOP_QUEUE = "bench.noop"
NOOP_TASK = "bench.noop"


def _config() -> dict[str, Any]:
    # The service's own configuration, only routed to a queue of our own.
    config = celery_config(get_settings())
    config.update(
        task_default_queue=NOOP_QUEUE,
        task_routes={NOOP_TASK: {"queue": NOOP_QUEUE}},
        beat_schedule={},
    )
    return config


app = Celery("bench_noop")
app.add_defaults(_config)


@app.task(name=NOOP_TASK, ignore_result=True)
def noop(sid: str) -> None:
    """Nothing at all: what remains is the cost of moving one task through Celery."""
