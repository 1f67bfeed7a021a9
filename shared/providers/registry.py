"""Which providers exist, and building a provider's client from its account's credentials."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from shared.core.settings import Settings

# Imported for their @register side effect: every built-in adapter is known once this is.
from shared.providers import simulator, twilio, vonage  # noqa: F401
from shared.providers.interface import (
    _REGISTRY,
    _REQUIRED,
    PermanentProviderError,
    Provider,
    ProviderFactory,
)


def missing_credentials(name: str, credentials: Mapping[str, Any]) -> list[str]:
    """The credentials `name` needs that are absent or empty (a typo in a key, say)."""
    return [key for key in _REQUIRED.get(name, ()) if not credentials.get(key)]


def provider_factory(name: str) -> ProviderFactory:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise PermanentProviderError("unknown-provider", f"no provider named {name!r}") from None

    def build(credentials: Mapping[str, Any], settings: Settings) -> Provider:
        # Misconfigured settings are final at once: retrying cannot make a credential appear.
        if missing := missing_credentials(name, credentials):
            raise PermanentProviderError("configuration", f"missing credentials: {missing}")
        return factory(credentials, settings)

    return build


def provider_names() -> list[str]:
    return sorted(_REGISTRY)


class ProviderClients:
    """One client per provider account and its current credentials, built once per process
    and shared by its threads, so connections are reused."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, str], Provider] = {}

    def client(
        self, provider: str, provider_account_id: int, credentials: Mapping[str, Any]
    ) -> Provider:
        key = (provider_account_id, repr(sorted(credentials.items())))
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = provider_factory(provider)(credentials, self._settings)
                self._clients[key] = client
            return client
