"""Which provider accounts keep failing: a circuit per provider account, open for
SMSD_BREAKER_COOLDOWN after SMSD_BREAKER_THRESHOLD failures within SMSD_BREAKER_WINDOW.

Kept in Redis so every worker sees a provider's outage at once; the embedded single-process
setup keeps them in memory."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Protocol

import redis

from shared.core.settings import Settings


class CircuitBreakers(Protocol):
    def failed(self, provider_account_id: int) -> None: ...

    def succeeded(self, provider_account_id: int) -> None: ...

    def is_open(self, provider_account_id: int) -> bool:
        """True while a provider account's circuit is open: skip it, it keeps failing."""
        ...


def _key(provider_account_id: int) -> str:
    return f"provider-account:{provider_account_id}"


class RedisCircuitBreakers:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings

    def failed(self, provider_account_id: int) -> None:
        failures = f"smsd:breaker:{_key(provider_account_id)}:failures"
        with self._redis.pipeline() as pipe:
            pipe.incr(failures)
            pipe.expire(failures, _seconds(self._settings.breaker_window), nx=True)
            count = int(pipe.execute()[0])
        if count >= self._settings.breaker_threshold:
            self._redis.set(
                f"smsd:breaker:{_key(provider_account_id)}:open",
                1,
                ex=_seconds(self._settings.breaker_cooldown),
            )
            self._redis.delete(failures)

    def succeeded(self, provider_account_id: int) -> None:
        self._redis.delete(f"smsd:breaker:{_key(provider_account_id)}:failures")

    def is_open(self, provider_account_id: int) -> bool:
        return bool(self._redis.exists(f"smsd:breaker:{_key(provider_account_id)}:open"))


class LocalCircuitBreakers:
    """The same rules for one process (the embedded default runs one worker)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._failures: dict[int, list[float]] = {}
        self._open_until: dict[int, float] = {}

    def failed(self, provider_account_id: int) -> None:
        with self._lock:
            now = time.monotonic()
            window = self._settings.breaker_window.total_seconds()
            recent = [t for t in self._failures.get(provider_account_id, []) if now - t < window]
            recent.append(now)
            self._failures[provider_account_id] = recent
            if len(recent) >= self._settings.breaker_threshold:
                self._open_until[provider_account_id] = (
                    now + self._settings.breaker_cooldown.total_seconds()
                )
                self._failures[provider_account_id] = []

    def succeeded(self, provider_account_id: int) -> None:
        with self._lock:
            self._failures.pop(provider_account_id, None)

    def is_open(self, provider_account_id: int) -> bool:
        with self._lock:
            return self._open_until.get(provider_account_id, 0.0) > time.monotonic()


def _seconds(span: timedelta) -> int:
    return max(1, int(span.total_seconds()))


def circuit_breakers(settings: Settings) -> CircuitBreakers:
    """Redis when there is one to share, memory otherwise."""
    if settings.redis_url:
        return RedisCircuitBreakers(redis.Redis.from_url(settings.redis_url), settings)
    return LocalCircuitBreakers(settings)
