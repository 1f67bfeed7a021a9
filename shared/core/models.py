"""The schema, as SQLAlchemy 2 models. Alembic migrations create it; `create_all` is never used."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind stored)."""
    return datetime.now(UTC)


def table_of(model: type[Base]) -> Table:
    """A model's table, for the statements the hot paths build once and run as Core."""
    return cast(Table, model.__table__)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC, also on SQLite (which stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text: store them all naive-UTC so the comparison is right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")

# Stable constraint names so migrations and autogenerate agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MessageStatus(enum.StrEnum):
    """One lifecycle for every provider. Order of rank: queued < sending < sent / in_doubt <
    a final status."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    # A provider call that may have reached the provider, which cannot be asked whether it
    # did (Vonage): not sent again; a receipt may still settle it, else it ends `unknown`.
    IN_DOUBT = "in_doubt"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"
    OPTED_OUT = "opted_out"
    # The provider took it (or may have) but never gave a final word within the receipt window,
    # and cannot be asked: final, so nothing waits on it forever.
    UNKNOWN = "unknown"
    # Withdrawn before a worker took it: its bulk batch was cancelled (DELETE .../bulk/{batchId}).
    CANCELLED = "cancelled"

    @property
    def rank(self) -> int:
        return _RANK.get(self, 3)

    @property
    def is_final(self) -> bool:
        return self.rank == 3


_RANK = {
    MessageStatus.QUEUED: 0,
    MessageStatus.SENDING: 1,
    MessageStatus.SENT: 2,
    MessageStatus.IN_DOUBT: 2,
}


class Account(Base):
    """A tenant. `tenant_id` is both the `Tenant-Id` header and the `{accountID}` in URLs."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    default_environment: Mapped[str] = mapped_column(String(64))
    # The system (master) account lends its provider settings to accounts that have none.
    is_system: Mapped[bool] = mapped_column(Boolean, default=False)
    # How many provider attempts a message gets before it fails (None: SMSD_MAX_SEND_ATTEMPTS).
    max_send_attempts: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    environments: Mapped[list[Environment]] = relationship(back_populates="account")


class ApplicationKey(Base):
    """An Application-Key, stored only as its SHA-256; several may be valid during a rotation."""

    __tablename__ = "application_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an operator can tell keys apart without seeing them.
    key_prefix: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Environment(Base):
    """DEV, TEST, PROD or whatever the account promotes its campaigns through."""

    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))

    account: Mapped[Account] = relationship(back_populates="environments")


class Campaign(Base):
    """An SMS campaign: text with a `<link>` placeholder and the link it stands for."""

    __tablename__ = "campaigns"
    __table_args__ = (UniqueConstraint("environment_id", "campaign_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    message_text: Mapped[str] = mapped_column(Text)
    link_url: Mapped[str | None] = mapped_column(String(2048))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Send `/l/<code>` instead of the full link, so long links fit an SMS and clicks are counted.
    shorten_links: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The longest rendered SMS accepted, in segments (153 GSM-7 / 67 UCS-2 characters each).
    max_segments: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime())
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # "HH:MM-HH:MM": the recipient's local times of day its bulk texts wait out (deferred, not
    # dropped; shared/text/quiet_hours.py). None: no quiet hours.
    quiet_hours: Mapped[str | None] = mapped_column(String(11))
    # Where its messages' status changes are POSTed when neither the send nor its bulk batch
    # names a statusCallback of its own (shared/messages/status_callbacks.py).
    status_callback: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class ProviderAccount(Base):
    """Telephony provider settings of an account: which provider, its credentials, our senders."""

    __tablename__ = "provider_accounts"
    __table_args__ = (Index("ix_provider_accounts_provider_public_id", "provider", "public_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(32))
    credentials: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    # The credential a provider names in its webhooks (Twilio's AccountSid, Vonage's api-key,
    # the simulator's account id), kept beside the secrets so a webhook finds its settings
    # by index; its secret then decides whether the webhook is genuine.
    public_id: Mapped[str | None] = mapped_column(String(128))
    # E.164 numbers or alphanumeric sender ids; the first is used when a request names none.
    sender_ids: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Carrier throughput: segments per second for each sender, and for the whole account.
    sender_rate: Mapped[float | None] = mapped_column(Float)
    account_rate: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def __repr__(self) -> str:
        # Credentials are secrets: never let them reach a log line through repr().
        return f"ProviderAccount(id={self.id!r}, provider={self.provider!r})"


class ConfigGeneration(Base):
    """One row whose value changes, in the same transaction, with any change to the tables the
    accept path caches (accounts, keys, environments, campaigns, provider settings).

    PostgreSQL triggers (migration 0004) write a fresh random value on every such change,
    TRUNCATE included, so a per-process cache that reads this row at the start of a request
    knows exactly whether what it holds is still current (shared/core/config_cache.py)."""

    __tablename__ = "config_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[str] = mapped_column(String(36))


class OutboxState(Base):
    """One row: the broker epoch the sweeper last saw. A different epoch in the broker means
    the broker lost what it held, so what was published must be published again."""

    __tablename__ = "outbox_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    broker_epoch: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class InteractionToken(Base):
    """A per-call `jpToken` issued by generateToken; it ties an SMS back to the call."""

    __tablename__ = "interaction_tokens"
    __table_args__ = (UniqueConstraint("account_id", "token"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    token: Mapped[str] = mapped_column(String(32))
    caller: Mapped[str] = mapped_column(String(32))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


SENT_BY_SERVICE = "service"
SENT_BY_EXTERNAL = "external"


class DeflectedCall(Base):
    """One row per call in the Deflected Call Report: created with its token, `smsSent` later."""

    __tablename__ = "deflected_calls"

    token_id: Mapped[int] = mapped_column(
        ForeignKey("interaction_tokens.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    token_issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    campaign_id: Mapped[str | None] = mapped_column(String(128))
    sms_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    sms_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # `service` when we sent it, `external` when Notify SMS said the caller's gateway did.
    sms_sent_by: Mapped[str | None] = mapped_column(String(16))
    sms_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_message_sid: Mapped[str | None] = mapped_column(String(34))
    sms_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    link_first_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    link_clicks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class OptOut(Base):
    """A recipient who texted STOP to one of an account's senders: never sent to again from it."""

    __tablename__ = "opt_outs"
    __table_args__ = (UniqueConstraint("account_id", "sender", "recipient"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    sender: Mapped[str] = mapped_column(String(32))
    recipient: Mapped[str] = mapped_column(String(32))
    keyword: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ShortLink(Base):
    """`/l/<code>`: a short link that redirects to a campaign link and counts its clicks."""

    __tablename__ = "short_links"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    target_url: Mapped[str] = mapped_column(Text)
    # The call the link was made for, so a click lands on its deflection record.
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("interaction_tokens.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    first_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def _partial_index(name: str, column: str, where: str) -> Index:
    return Index(name, column, postgresql_where=text(where), sqlite_where=text(where))


class Message(Base):
    """One SMS: recorded before the caller hears 200, then claimed, sent and tracked."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key"),
        # The sweeper's two questions (never published; published but never claimed) and the
        # reconciler's (sent or in doubt, and silent). Partial: every status change writes an
        # entry into each index that holds the row (no status change is a HOT update), and
        # these hold only the messages in the statuses they are asked about (migration 0007).
        # Single sends only (migration 0009): a bulk batch's queued messages are the bulk pump's,
        # in an index of their own, read a batch at a time by when they were published.
        _partial_index(
            "ix_messages_queued_published_at",
            "published_at",
            "status = 'queued' AND batch_id IS NULL",
        ),
        Index(
            "ix_messages_bulk_queued",
            "batch_id",
            "published_at",
            "sid",
            postgresql_where=text("status = 'queued' AND batch_id IS NOT NULL"),
            sqlite_where=text("status = 'queued' AND batch_id IS NOT NULL"),
        ),
        _partial_index(
            "ix_messages_sending_lease_expires_at", "lease_expires_at", "status = 'sending'"
        ),
        _partial_index(
            "ix_messages_silent_updated_at", "updated_at", "status IN ('sent', 'in_doubt')"
        ),
        Index("ix_messages_provider_message_id", "provider", "provider_message_id"),
        Index("ix_messages_account_id_created_at", "account_id", "created_at"),
        # A bulk batch's progress and cancellation; single sends stay out of it.
        Index(
            "ix_messages_batch_id_status",
            "batch_id",
            "status",
            postgresql_where=text("batch_id IS NOT NULL"),
            sqlite_where=text("batch_id IS NOT NULL"),
        ),
    )

    sid: Mapped[str] = mapped_column(String(34), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    campaign_pk: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128))
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("interaction_tokens.id", ondelete="SET NULL"), index=True
    )
    to_number: Mapped[str] = mapped_column(String(32))
    from_number: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    segments: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    encoding: Mapped[str] = mapped_column(String(8), default="gsm7", server_default="gsm7")
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.QUEUED.value)
    provider: Mapped[str] = mapped_column(String(32))
    provider_account_id: Mapped[int] = mapped_column(
        ForeignKey("provider_accounts.id", ondelete="RESTRICT")
    )
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    # A provider that answers one id per SMS part (Vonage): how many parts it was sent as,
    # and how many of them it refused; delivered means every part delivered (MessagePart).
    parts_expected: Mapped[int | None] = mapped_column(Integer)
    parts_unsent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Transient failures in a row on the current provider; past a bound the next one takes over.
    provider_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The bulk batch it came in (BulkBatch.id); none for a single send. No foreign key: a
    # single send would pay the check's trigger for nothing, and the account's cascade
    # removes a batch's messages with the batch.
    batch_id: Mapped[str | None] = mapped_column(String(34))
    # Where its status changes are POSTed (its own statusCallback, else its batch's, else its
    # campaign's, as they were when it was accepted); a trigger queues each change for it
    # (StatusCallback, migration 0012).
    status_callback: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Since when a provider call that may have reached the provider is unresolved: the next
    # claim looks the message up (or resends through a provider that deduplicates).
    in_doubt_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the reconciler last asked the provider about it (or gave up on it: `unknown`).
    reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    final_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class BulkBatch(Base):
    """One bulk send request (POST .../bulk): its recipients are messages with its id, and
    its answer is kept so a retry with the same Idempotency-Key gets it again."""

    __tablename__ = "bulk_batches"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key"),
        # The bulk pump's question on every run: which batches are not finished.
        _partial_index("ix_bulk_batches_unfinished", "created_at", "finished_at IS NULL"),
    )

    id: Mapped[str] = mapped_column(String(34), primary_key=True)  # "BB" + 32 hex digits
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    campaign_pk: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    campaign_id: Mapped[str] = mapped_column(String(128))
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    # The rejected rows as answered: [{"row", "parameter", "error"}, ...].
    rejected: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the bulk pump found none of its messages queued or being sent: it looks no more.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the bulk pump last put a task of it on the queue: the tenant whose batches were
    # served longest ago gets the next turn, in every process alike.
    pumped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The batch's `?statusCallback=`, given to each of its messages.
    status_callback: Mapped[str | None] = mapped_column(String(2048))


class DeliveryEvent(Base):
    """Every status change and every raw provider callback, matched to a message or not."""

    __tablename__ = "delivery_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    message_sid: Mapped[str | None] = mapped_column(
        ForeignKey("messages.sid", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    provider_status: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(32))
    # False when a callback arrived too late to change anything (an older status after a final one).
    applied: Mapped[bool] = mapped_column(Boolean, default=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    # What makes a provider callback the same callback again (provider, its message id and
    # status, or Twilio's idempotency token): a repeat finds it taken and is stored once.
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MessagePart(Base):
    """One SMS part of a message a provider took as several (one id and one receipt each)."""

    __tablename__ = "message_parts"

    message_sid: Mapped[str] = mapped_column(
        ForeignKey("messages.sid", ondelete="CASCADE"), primary_key=True
    )
    provider_message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The order the provider answered in; None for a part first seen in a receipt that
    # overtook the worker's own record of the send.
    part_index: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookSecret(Base):
    """An account's key for signing its status callbacks. The newest unretired one signs; one
    retired less than SMSD_WEBHOOK_SECRET_OVERLAP ago signs too, so a receiver can switch to
    the new secret after a rotation without refusing a single callback."""

    __tablename__ = "webhook_secrets"
    __table_args__ = (
        # One current secret per account (two deliverers making its first at once).
        Index(
            "uq_webhook_secrets_current",
            "account_id",
            unique=True,
            postgresql_where=text("retired_at IS NULL"),
            sqlite_where=text("retired_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"WebhookSecret(id={self.id!r}, account_id={self.account_id!r})"


class StatusCallback(Base):
    """One status change of a message, to be POSTed to its statusCallback URL. Written by a
    trigger on `messages` in the changing transaction (migration 0012); delivered in order per
    message (the next waits until this one is done), at least once, retried with backoff until
    SMSD_STATUS_CALLBACK_RETRY_FOR after the change."""

    __tablename__ = "status_callbacks"
    __table_args__ = (
        Index("ix_status_callbacks_message_sid_id", "message_sid", "id"),
        # The deliverer's question every run: what is not done, and due.
        _partial_index("ix_status_callbacks_pending", "next_attempt_at", "done_at IS NULL"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    message_sid: Mapped[str] = mapped_column(ForeignKey("messages.sid", ondelete="CASCADE"))
    account_id: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Taken by a deliverer until then; past it (the deliverer died) another takes it again.
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # `delivered` (a 2xx) or `given_up` (still failing SMSD_STATUS_CALLBACK_RETRY_FOR after
    # the change); None while pending.
    outcome: Mapped[str | None] = mapped_column(String(16))
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @staticmethod
    def event_id(sid: str, ordinal: int) -> str:
        """A change's id as callers see it, the same on every attempt: its message's sid and
        its place among that message's changes (`SM...-2`, the second). Not the row's id,
        which would tell every caller how much the service sends."""
        return f"{sid}-{ordinal}"


class StatusCallbackAttempt(Base):
    """One POST of a status callback, as it went: shown with the message."""

    __tablename__ = "status_callback_attempts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    callback_id: Mapped[int] = mapped_column(
        ForeignKey("status_callbacks.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The receiver's HTTP status; None when no answer came (refused, timed out, unreachable).
    response_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(200))
    duration_ms: Mapped[int] = mapped_column(Integer)
