"""Provider adapters: one module per provider behind one small interface, registered by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

from shared.core.settings import Settings


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Everything a provider needs for one SMS; `idempotency_key` is our messageSid."""

    idempotency_key: str
    to: str
    sender: str
    body: str
    status_callback_url: str
    validity_seconds: int


@dataclass(frozen=True, slots=True)
class SendResult:
    """The provider took the message: its id for it, and the status it reported."""

    provider_message_id: str
    provider_status: str
    raw: Mapping[str, Any]
    # A message the provider split into several SMS (Vonage answers one id per part): every
    # part's id in order, the first being `provider_message_id`. Empty for a single part.
    parts: tuple[str, ...] = ()
    # Parts the provider refused while taking the others (Vonage's partial failure): the
    # message is not re-sent, since the parts that went out would reach the handset twice.
    unsent_parts: int = 0


class ProviderError(Exception):
    """A send the provider did not take, with the provider's own code and text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TransientProviderError(ProviderError):
    """Worth retrying: timeouts, throttling, the provider's 5xx."""


class InDoubtProviderError(ProviderError):
    """The request may have reached the provider and we do not know what it did: a read
    timeout, a connection reset after the request was written, a gateway's 5xx that may have
    been forwarded. Never retried blindly: resolved by the provider's own means (`find`, an
    idempotency key), or the message is marked `in_doubt`."""


class PermanentProviderError(ProviderError):
    """Final at once: invalid number, rejected content, bad credentials."""


class RecipientOptedOut(PermanentProviderError):
    """The provider refuses: the recipient unsubscribed from this sender (Twilio 21610)."""


class Provider(Protocol):
    """What the worker needs from a provider."""

    name: ClassVar[str]
    # True when a repeated send with the same idempotency key cannot reach the handset twice;
    # only then may a send that a dead worker left in doubt be tried again.
    idempotent: ClassVar[bool]

    # True when `find` can tell whether the provider has a message we sent (Twilio can list
    # messages by recipient, sender and time); then a send in doubt is looked up, not guessed.
    searchable: ClassVar[bool]

    def send(self, request: SendRequest) -> SendResult: ...

    def find(
        self, request: SendRequest, sent_after: datetime, taken: frozenset[str] = frozenset()
    ) -> SendResult | None:
        """The provider's record of this message if it has one (None: it provably has not),
        skipping the provider ids in `taken` (our other messages of the same text to the same
        number hold them). Only called when `searchable`; raises a ProviderError when the
        provider cannot be asked right now."""
        ...

    def status_of(self, provider_message_id: str) -> str | None:
        """The provider's status word for a message now, for messages whose receipts never
        came; None when the provider cannot be asked (most cannot)."""
        ...

    def close(self) -> None: ...


ProviderFactory = Callable[[Mapping[str, Any], Settings], Provider]

_REGISTRY: dict[str, ProviderFactory] = {}
_REQUIRED: dict[str, tuple[str, ...]] = {}


def register(
    name: str, requires: tuple[str, ...] = ()
) -> Callable[[ProviderFactory], ProviderFactory]:
    """Decorator: make a provider available under `name`, needing these credentials."""

    def decorate(factory: ProviderFactory) -> ProviderFactory:
        _REGISTRY[name] = factory
        _REQUIRED[name] = requires
        return factory

    return decorate


@runtime_checkable
class SendsAsync(Protocol):
    """A provider client that can also send on an event loop (its HTTP client is async): a
    worker sends a batch's messages for it side by side on one thread."""

    async def send_async(self, request: SendRequest) -> SendResult: ...
