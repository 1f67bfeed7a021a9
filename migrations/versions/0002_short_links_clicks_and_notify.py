"""short links, clicks and notify

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 13:24:16.256334
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "short_links",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("target_url", sa.Text(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("clicks", sa.Integer(), nullable=False),
        sa.Column("first_clicked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_clicked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_short_links_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["interaction_tokens.id"],
            name=op.f("fk_short_links_token_id_interaction_tokens"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_short_links")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("shorten_links", sa.Boolean(), server_default=sa.false(), nullable=False)
        )

    with op.batch_alter_table("deflected_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sms_sent_by", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("link_first_clicked_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("link_clicks", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("sms_count", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:

    with op.batch_alter_table("deflected_calls", schema=None) as batch_op:
        batch_op.drop_column("sms_count")
        batch_op.drop_column("link_clicks")
        batch_op.drop_column("link_first_clicked_at")
        batch_op.drop_column("sms_sent_by")

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("shorten_links")

    op.drop_table("short_links")
