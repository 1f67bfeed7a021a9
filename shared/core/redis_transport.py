"""kombu's Redis transport, closing every channel when the broker is lost.

Why: kombu's virtual ``Transport.close_connection`` (kombu/transport/virtual/base.py,
``close_connection``, kombu 5.7.0) stops at the first channel whose ``close()`` raises. With
Redis gone that is the pidbox (remote control) channel, whose auto-delete fanout queue cannot
be deleted. ``kombu.Connection._do_close_self`` swallows that error, then
``_do_close_transport`` sets ``transport.client = None``. The channels never closed (the task
channel, holding the prefetched, unacked send tasks) are closed later, and restoring their
unacked messages needs a new pool: ``Channel._connparams`` (kombu/transport/redis.py, around
line 1959) reads ``self.connection.client.hostname`` on ``None`` and the worker dies with
``Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")``.

Closing every channel while ``client`` is still set lets the consumer reconnect instead.
Celery loads this class through ``broker_transport`` (see ``worker.celery_app``)."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

logger = logging.getLogger(__name__)


class Transport(redis.Transport):
    def close_connection(self, connection: Any) -> None:
        if self.cycle is not None:
            self.cycle.close()
        avail: list[Any] = self._avail_channels  # type: ignore[attr-defined]  # untyped in kombu
        for chan_list in avail, self.channels:
            while chan_list:
                try:
                    channel = chan_list.pop()
                except LookupError:  # pragma: no cover  (emptied meanwhile)
                    break
                try:
                    channel.close()
                except self.connection_errors as exc:
                    # The broker is gone: keep closing the others while self.client is set.
                    logger.debug("closing channel %r failed: %r", channel, exc)
