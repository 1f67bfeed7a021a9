"""What all workers must agree on: send rates per sender and per provider account, and which
providers are failing. Kept in Redis so every worker process shares it (Celery's own
`rate_limit` is per worker); the embedded single-process setup keeps it in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import redis

from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` sends through `key`: spaced evenly, no bursts, so no second ever holds more."""

    key: str
    per_second: float


class Coordination(Protocol):
    def take(self, rates: Sequence[Rate], cost: int) -> float:
        """0 and the sends are booked on every rate, or the seconds to wait (nothing booked)."""
        ...

    def failed(self, provider_key: str) -> None: ...

    def succeeded(self, provider_key: str) -> None: ...

    def is_open(self, provider_key: str) -> bool:
        """True while a provider's circuit is open: skip it, it keeps failing."""
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


class RedisCoordination:
    def __init__(self, url: str, settings: Settings) -> None:
        self._redis = redis.Redis.from_url(url)
        self._take = self._redis.register_script(_TAKE)
        self._settings = settings

    def take(self, rates: Sequence[Rate], cost: int) -> float:
        if not rates:
            return 0.0
        keys = [f"smsd:rate:{rate.key}" for rate in rates]
        intervals = [cost / rate.per_second for rate in rates]
        return float(self._take(keys=keys, args=intervals))

    def failed(self, provider_key: str) -> None:
        failures = f"smsd:breaker:{provider_key}:failures"
        with self._redis.pipeline() as pipe:
            pipe.incr(failures)
            pipe.expire(failures, _seconds(self._settings.breaker_window), nx=True)
            count = int(pipe.execute()[0])
        if count >= self._settings.breaker_threshold:
            self._redis.set(
                f"smsd:breaker:{provider_key}:open",
                1,
                ex=_seconds(self._settings.breaker_cooldown),
            )
            self._redis.delete(failures)

    def succeeded(self, provider_key: str) -> None:
        self._redis.delete(f"smsd:breaker:{provider_key}:failures")

    def is_open(self, provider_key: str) -> bool:
        return bool(self._redis.exists(f"smsd:breaker:{provider_key}:open"))


class LocalCoordination:
    """The same rules for one process (the embedded default runs one worker)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._next_free: dict[str, float] = {}
        self._failures: dict[str, list[float]] = {}
        self._open_until: dict[str, float] = {}

    def take(self, rates: Sequence[Rate], cost: int) -> float:
        with self._lock:
            now = time.monotonic()
            wait = max((self._next_free.get(r.key, 0.0) - now for r in rates), default=0.0)
            if wait > 0:
                return wait
            for rate in rates:
                self._next_free[rate.key] = now + cost / rate.per_second
            return 0.0

    def failed(self, provider_key: str) -> None:
        with self._lock:
            now = time.monotonic()
            window = self._settings.breaker_window.total_seconds()
            recent = [t for t in self._failures.get(provider_key, []) if now - t < window]
            recent.append(now)
            self._failures[provider_key] = recent
            if len(recent) >= self._settings.breaker_threshold:
                self._open_until[provider_key] = (
                    now + self._settings.breaker_cooldown.total_seconds()
                )
                self._failures[provider_key] = []

    def succeeded(self, provider_key: str) -> None:
        with self._lock:
            self._failures.pop(provider_key, None)

    def is_open(self, provider_key: str) -> bool:
        with self._lock:
            return self._open_until.get(provider_key, 0.0) > time.monotonic()


def _seconds(span: timedelta) -> int:
    return max(1, int(span.total_seconds()))


def coordination(settings: Settings) -> Coordination:
    """Redis when there is one to share, memory otherwise."""
    if settings.redis_url:
        return RedisCoordination(settings.redis_url, settings)
    return LocalCoordination(settings)
