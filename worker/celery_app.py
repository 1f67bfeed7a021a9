"""The workers' Celery app (`celery -A worker.celery_app`), configured by shared/core/broker.py,
and what a worker process does at start: logging, provider CAs and SDKs, its metrics."""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery.signals import setup_logging, task_postrun, task_prerun, worker_init, worker_ready

from shared.core.broker import create_celery
from shared.core.logging import configure_logging
from shared.core.settings import get_settings

# The app `celery -A worker.celery_app` loads, configured from the environment on first use.
app = create_celery()


@setup_logging.connect
def _configure_logging(**_kwargs: Any) -> None:
    configure_logging(get_settings())


@worker_init.connect
def _trust_provider_ca(**_kwargs: Any) -> None:
    # The provider SDKs use requests, which reads its CA bundle from this variable: the way to
    # make them trust the local simulator's certificate without touching the SDKs.
    ca_file = get_settings().provider_ca_file
    if ca_file is not None:
        os.environ["REQUESTS_CA_BUNDLE"] = str(ca_file)  # configured: it wins over the default


@worker_init.connect
def _import_providers(**_kwargs: Any) -> None:
    # The provider SDKs take a second of CPU to import: pay it before the first task, not in it,
    # so the first sends after a (re)start are not late.
    from shared.providers.registry import provider_names

    provider_names()


@worker_ready.connect
def _serve_metrics(**_kwargs: Any) -> None:
    # Once the worker consumes (and after an embedded beat forked off, which must not inherit
    # the listening socket): this process's metrics, when SMSD_WORKER_METRICS_PORT is set.
    settings = get_settings()
    if settings.worker_metrics_port:
        from worker.metrics import serve_metrics

        serve_metrics(settings)


@task_prerun.connect
def _bind_task_context(task_id: str | None = None, **_kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id)


@task_postrun.connect
def _clear_task_context(**_kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
