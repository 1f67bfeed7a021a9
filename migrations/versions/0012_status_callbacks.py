"""status callbacks: a caller's statusCallback URL, every status change queued for it, each
delivery attempt, and the accounts' webhook secrets

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 20:30:00

A status change is queued for its callback by a trigger on `messages`, in the transaction that
changes the status: every path that moves a status (claims, sends, receipts, the reconciler,
cancellation), now or later, is covered without a line of its own, and a change is queued if
and only if it commits. Only messages that have a callback pay for it: the trigger's WHEN
clause is false for the others, and PostgreSQL then does not even queue the trigger's event.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = "done_at IS NULL"
_CURRENT = "retired_at IS NULL"
_COLUMNS = (
    "message_sid, account_id, url, status, error_code, error_message, changed_at, next_attempt_at"
)
_VALUES = (
    "NEW.sid, NEW.account_id, NEW.status_callback, NEW.status, NEW.error_code,"
    " NEW.error_message, NEW.updated_at, NEW.updated_at"
)


def upgrade() -> None:
    for table in ("messages", "campaigns", "bulk_batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("status_callback", sa.String(length=2048), nullable=True))
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_webhook_secrets_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_secrets")),
    )
    op.create_index(
        op.f("ix_webhook_secrets_account_id"), "webhook_secrets", ["account_id"], unique=False
    )
    # One current secret per account: two deliverers making an account's first at once must
    # not each sign with a different one.
    op.create_index(
        "uq_webhook_secrets_current",
        "webhook_secrets",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text(_CURRENT),
        sqlite_where=sa.text(_CURRENT),
    )
    op.create_table(
        "status_callbacks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("message_sid", sa.String(length=34), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_sid"],
            ["messages.sid"],
            name=op.f("fk_status_callbacks_message_sid_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_callbacks")),
    )
    op.create_index("ix_status_callbacks_message_sid_id", "status_callbacks", ["message_sid", "id"])
    op.create_index(
        "ix_status_callbacks_pending",
        "status_callbacks",
        ["next_attempt_at"],
        postgresql_where=sa.text(_PENDING),
        sqlite_where=sa.text(_PENDING),
    )
    op.create_table(
        "status_callback_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "callback_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["callback_id"],
            ["status_callbacks.id"],
            name=op.f("fk_status_callback_attempts_callback_id_status_callbacks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_callback_attempts")),
    )
    op.create_index(
        op.f("ix_status_callback_attempts_callback_id"),
        "status_callback_attempts",
        ["callback_id"],
        unique=False,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION queue_status_callback() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO status_callbacks ({_COLUMNS}) VALUES ({_VALUES});
                RETURN NULL;
            END $$
            """  # noqa: S608 - our own column names
        )
        op.execute(
            "CREATE TRIGGER messages_status_callback AFTER UPDATE OF status ON messages"
            " FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status"
            " AND NEW.status_callback IS NOT NULL)"
            " EXECUTE FUNCTION queue_status_callback()"
        )
    else:
        trigger = (
            "CREATE TRIGGER messages_status_callback AFTER UPDATE OF status ON messages"  # noqa: S608
            " FOR EACH ROW WHEN NEW.status IS NOT OLD.status AND NEW.status_callback IS NOT NULL"
            f" BEGIN INSERT INTO status_callbacks ({_COLUMNS}) VALUES ({_VALUES}); END"
        )
        op.execute(trigger)  # our own column names, no input


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER messages_status_callback ON messages")
        op.execute("DROP FUNCTION queue_status_callback()")
    else:
        op.execute("DROP TRIGGER messages_status_callback")
    op.drop_index(
        op.f("ix_status_callback_attempts_callback_id"), table_name="status_callback_attempts"
    )
    op.drop_table("status_callback_attempts")
    op.drop_index("ix_status_callbacks_pending", table_name="status_callbacks")
    op.drop_index("ix_status_callbacks_message_sid_id", table_name="status_callbacks")
    op.drop_table("status_callbacks")
    op.drop_index("uq_webhook_secrets_current", table_name="webhook_secrets")
    op.drop_index(op.f("ix_webhook_secrets_account_id"), table_name="webhook_secrets")
    op.drop_table("webhook_secrets")
    for table in ("bulk_batches", "campaigns", "messages"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("status_callback")
