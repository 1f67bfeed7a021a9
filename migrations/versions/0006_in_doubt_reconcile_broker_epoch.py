"""in doubt, reconciliation, broker epoch: what the fault-tolerant send path keeps

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("in_doubt_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=True))
    # The reconciler's question: sent (or in doubt) and silent since when.
    op.create_index("ix_messages_status_updated_at", "messages", ["status", "updated_at"])
    op.create_table(
        "outbox_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("broker_epoch", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_state")),
    )


def downgrade() -> None:
    op.drop_table("outbox_state")
    op.drop_index("ix_messages_status_updated_at", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("reconciled_at")
        batch.drop_column("in_doubt_since")
