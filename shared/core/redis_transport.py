"""kombu's Redis transport, with two changes.

One synchronous client per channel. kombu builds a new ``redis.Redis`` for every delivery's
bookkeeping and every ack (``Channel.conn_or_acquire`` calls ``_create_client``), and building
one (its table of response callbacks) cost 4% of a busy worker's CPU (py-spy, 300 sends/s). A
client on a connection pool is safe to share between threads (it takes a connection from the
pool per command). A channel whose pool is dropped (after a fork, on close, after a failed
ping) builds a new client with its next pool.

Every channel closed when the broker is lost. Why: kombu's virtual
``Transport.close_connection`` (kombu/transport/virtual/base.py, kombu 5.7.0) stops at the first
channel whose ``close()`` raises. With Redis gone that is the pidbox (remote control) channel,
whose auto-delete fanout queue cannot be deleted. ``kombu.Connection._do_close_self`` swallows
that error, then ``_do_close_transport`` sets ``transport.client = None``. The channels never
closed (the task channel, holding the prefetched, unacked send tasks) are closed later, and
restoring their unacked messages needs a new pool: ``Channel._connparams``
(kombu/transport/redis.py, around line 1959) reads ``self.connection.client.hostname`` on
``None`` and the worker dies with
``Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")``.

Closing every channel while ``client`` is still set lets the consumer reconnect instead.
Celery loads this class through ``broker_transport`` (see ``worker.celery_app``)."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

logger = logging.getLogger(__name__)


class Channel(redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]  # untyped in kombu
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[misc]
        return client

    def _disconnect_pools(self) -> None:
        # The client must not keep the dropped pool (and its sockets) referenced.
        self._shared_client = None
        super()._disconnect_pools()  # type: ignore[misc]  # untyped in kombu


class Transport(redis.Transport):
    Channel = Channel

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
