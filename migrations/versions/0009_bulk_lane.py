"""bulk lane: the pump's index of a batch's messages not on the queue, and finished batches

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 17:00:00

A bulk batch's messages reach the broker through the bulk pump (shared/messages/lanes.py), a
window at a time, tenant by tenant, never all at once. The sweeper's index of queued messages
now holds single sends only: 100,000 messages of a batch waiting for the pump would otherwise
sit in front of every sweep. The pump and the check for messages lost in flight read a batch's
queued messages by when they were published from an index of their own, and the pump skips
batches it found finished.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SINGLE_QUEUED = "status = 'queued' AND batch_id IS NULL"
_BULK_QUEUED = "status = 'queued' AND batch_id IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("bulk_batches") as batch:
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index("ix_messages_queued_published_at", table_name="messages")
    op.create_index(
        "ix_messages_queued_published_at",
        "messages",
        ["published_at"],
        postgresql_where=sa.text(_SINGLE_QUEUED),
        sqlite_where=sa.text(_SINGLE_QUEUED),
    )
    op.create_index(
        "ix_messages_bulk_queued",
        "messages",
        ["batch_id", "published_at", "sid"],
        postgresql_where=sa.text(_BULK_QUEUED),
        sqlite_where=sa.text(_BULK_QUEUED),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_bulk_queued", table_name="messages")
    op.drop_index("ix_messages_queued_published_at", table_name="messages")
    op.create_index(
        "ix_messages_queued_published_at",
        "messages",
        ["published_at"],
        postgresql_where=sa.text("status = 'queued'"),
        sqlite_where=sa.text("status = 'queued'"),
    )
    with op.batch_alter_table("bulk_batches") as batch:
        batch.drop_column("finished_at")
