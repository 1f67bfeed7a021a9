"""providers opt-outs segments throughput

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 13:44:41.522234
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "opt_outs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("sender", sa.String(length=32), nullable=False),
        sa.Column("recipient", sa.String(length=32), nullable=False),
        sa.Column("keyword", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_opt_outs_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opt_outs")),
        sa.UniqueConstraint(
            "account_id", "sender", "recipient", name=op.f("uq_opt_outs_account_id")
        ),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_send_attempts", sa.Integer(), nullable=True))

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("max_segments", sa.Integer(), server_default="3", nullable=False)
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("segments", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(
            sa.Column("encoding", sa.String(length=8), server_default="gsm7", nullable=False)
        )
        batch_op.add_column(
            sa.Column("provider_failures", sa.Integer(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("provider_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sender_rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("account_rate", sa.Float(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("provider_accounts", schema=None) as batch_op:
        batch_op.drop_column("account_rate")
        batch_op.drop_column("sender_rate")

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("provider_failures")
        batch_op.drop_column("encoding")
        batch_op.drop_column("segments")

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("max_segments")

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("max_send_attempts")

    op.drop_table("opt_outs")
