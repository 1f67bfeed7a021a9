"""webhook binding: provider accounts found by public id, callbacks stored once, message parts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The credential each provider names in its webhooks (shared/accounts/access.py PUBLIC_ID_CREDENTIAL).
PUBLIC_ID_CREDENTIAL = {"twilio": "account_sid", "vonage": "api_key", "simulator": "account_id"}


def upgrade() -> None:
    with op.batch_alter_table("provider_accounts") as batch:
        batch.add_column(sa.Column("public_id", sa.String(length=128), nullable=True))
    op.create_index(
        "ix_provider_accounts_provider_public_id", "provider_accounts", ["provider", "public_id"]
    )
    accounts = sa.table(
        "provider_accounts",
        sa.column("id", sa.Integer),
        sa.column("provider", sa.String),
        sa.column("credentials", sa.JSON),
        sa.column("public_id", sa.String),
    )
    bind = op.get_bind()
    for row in bind.execute(sa.select(accounts.c.id, accounts.c.provider, accounts.c.credentials)):
        credential = PUBLIC_ID_CREDENTIAL.get(row.provider)
        value = (row.credentials or {}).get(credential) if credential else None
        if value:
            bind.execute(
                accounts.update().where(accounts.c.id == row.id).values(public_id=str(value))
            )

    with op.batch_alter_table("delivery_events") as batch:
        batch.add_column(sa.Column("dedupe_key", sa.String(length=255), nullable=True))
    op.create_index("ix_delivery_events_dedupe_key", "delivery_events", ["dedupe_key"], unique=True)

    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("parts_expected", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("parts_unsent", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "message_parts",
        sa.Column("message_sid", sa.String(length=34), nullable=False),
        sa.Column("provider_message_id", sa.String(length=128), nullable=False),
        sa.Column("part_index", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_code", sa.String(length=32), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_sid"],
            ["messages.sid"],
            name=op.f("fk_message_parts_message_sid_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "message_sid", "provider_message_id", name=op.f("pk_message_parts")
        ),
    )


def downgrade() -> None:
    op.drop_table("message_parts")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("parts_unsent")
        batch.drop_column("parts_expected")
    op.drop_index("ix_delivery_events_dedupe_key", table_name="delivery_events")
    with op.batch_alter_table("delivery_events") as batch:
        batch.drop_column("dedupe_key")
    op.drop_index("ix_provider_accounts_provider_public_id", table_name="provider_accounts")
    with op.batch_alter_table("provider_accounts") as batch:
        batch.drop_column("public_id")
