"""bulk lane: when each batch was last served, for turns that hold across processes

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 17:40:00

The bulk pump gives the tenant served longest ago the next turn. It used a counter of its own
process, which the API's pumps and every worker kept separately (and a pump the lane's rate held
back advanced it without serving anyone), so with two tenants the same one could come first
every time. `pumped_at` is the database's answer to "whose turn is it", the same for every
process. Batches finished before 0009 are marked finished here, so the pump never looks at them;
the pump finds its unfinished batches through a partial index.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNFINISHED = "finished_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("bulk_batches") as batch:
        batch.add_column(sa.Column("pumped_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_bulk_batches_unfinished",
        "bulk_batches",
        ["created_at"],
        postgresql_where=sa.text(_UNFINISHED),
        sqlite_where=sa.text(_UNFINISHED),
    )
    # Batches whose messages are all settled: finished (the pump would only find that out).
    op.execute(
        "UPDATE bulk_batches SET finished_at = CURRENT_TIMESTAMP WHERE finished_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.batch_id = bulk_batches.id"
        " AND messages.status IN ('queued', 'sending'))"
    )


def downgrade() -> None:
    op.drop_index("ix_bulk_batches_unfinished", table_name="bulk_batches")
    with op.batch_alter_table("bulk_batches") as batch:
        batch.drop_column("pumped_at")
