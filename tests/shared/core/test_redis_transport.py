"""Our kombu Redis transport (shared/core/redis_transport.py), on a real Redis: one synchronous
client per channel and connection pool, never a client on a dropped pool."""

from __future__ import annotations

from typing import Any

from kombu import Connection

TRANSPORT = "shared.core.redis_transport:Transport"


def test_a_channel_shares_one_client_until_its_pool_is_dropped(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as connection:
        channel: Any = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as acquired:  # what kombu's acks and deliveries use
            assert acquired is first
        assert first.connection_pool is channel.pool

        channel._disconnect_pools()  # as after a fork, on close or after a failed ping
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.ping()


def test_asynchronous_clients_are_not_shared(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as connection:
        channel: Any = connection.default_channel
        assert channel._create_client(asynchronous=True) is not channel._create_client(
            asynchronous=True
        )
