"""bulk batches: a bulk send request's record, and its messages marked with its id

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 14:20:00

`messages.batch_id` has no foreign key (a single send would pay the check's trigger on every
insert for a NULL); its index is partial, so single sends write no entry into it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH_WHERE = "batch_id IS NOT NULL"


def upgrade() -> None:
    op.create_table(
        "bulk_batches",
        sa.Column("id", sa.String(length=34), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("environment_id", sa.Integer(), nullable=False),
        sa.Column("campaign_pk", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.String(length=128), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column(
            "rejected",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_bulk_batches_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_bulk_batches_environment_id_environments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["campaign_pk"],
            ["campaigns.id"],
            name=op.f("fk_bulk_batches_campaign_pk_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_batches")),
        sa.UniqueConstraint(
            "account_id", "idempotency_key", name=op.f("uq_bulk_batches_account_id")
        ),
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(length=34), nullable=True))
    op.create_index(
        "ix_messages_batch_id_status",
        "messages",
        ["batch_id", "status"],
        postgresql_where=sa.text(_BATCH_WHERE),
        sqlite_where=sa.text(_BATCH_WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_batch_id_status", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("batch_id")
    op.drop_table("bulk_batches")
