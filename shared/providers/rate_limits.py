"""Carrier throughput limits per sender and per provider account, shared by every worker.

Kept in Redis so all worker processes agree (Celery's own `rate_limit` is per worker); the
embedded single-process setup keeps them in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis

from shared.core.settings import Settings


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` sends through `key`: spaced evenly, no bursts, so no second ever holds more."""

    key: str
    per_second: float


class RateLimits(Protocol):
    def take(self, rates: Sequence[Rate], cost: int) -> float:
        """0 and the sends are booked on every rate, or the seconds to wait (nothing booked)."""
        ...


# GCRA on Redis time: each key holds the earliest time the next send may start. All keys are
# checked first and booked only together, so a send never holds a slot it cannot use.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local wait = 0
for i, key in ipairs(KEYS) do
  local next_free = tonumber(redis.call('GET', key) or '0')
  if next_free - now > wait then wait = next_free - now end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local ms = math.ceil(interval * 1000) + 1000
  redis.call('SET', key, tostring(now + interval), 'PX', ms)
end
return '0'
"""


class RedisRateLimits:
    def __init__(self, client: redis.Redis) -> None:
        self._take = client.register_script(_TAKE)

    def take(self, rates: Sequence[Rate], cost: int) -> float:
        if not rates:
            return 0.0
        keys = [f"smsd:rate:{rate.key}" for rate in rates]
        intervals = [cost / rate.per_second for rate in rates]
        return float(self._take(keys=keys, args=intervals))


class LocalRateLimits:
    """The same rule for one process (the embedded default runs one worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_free: dict[str, float] = {}

    def take(self, rates: Sequence[Rate], cost: int) -> float:
        with self._lock:
            now = time.monotonic()
            wait = max((self._next_free.get(r.key, 0.0) - now for r in rates), default=0.0)
            if wait > 0:
                return wait
            for rate in rates:
                self._next_free[rate.key] = now + cost / rate.per_second
            return 0.0


def rate_limits(settings: Settings) -> RateLimits:
    """Redis when there is one to share, memory otherwise."""
    if settings.redis_url:
        return RedisRateLimits(redis.Redis.from_url(settings.redis_url))
    return LocalRateLimits()
