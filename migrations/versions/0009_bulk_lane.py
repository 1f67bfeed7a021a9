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

On PostgreSQL the indexes are built and dropped CONCURRENTLY, outside a transaction (as in
0007), so a running service keeps accepting and sending while this migrates a large table. The
sweeper's index is rebuilt under a new name first, and only then is the old one dropped and the
new one renamed: the sweeper is never without one. A run that failed half-way can be run again.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SWEEPERS = "ix_messages_queued_published_at"
_SWEEPERS_NEXT = "ix_messages_queued_single_published_at"
_SINGLE_QUEUED = "status = 'queued' AND batch_id IS NULL"
_BULK_QUEUED = "status = 'queued' AND batch_id IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("bulk_batches") as batch:
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    with _outside_transaction():
        op.drop_index("ix_messages_bulk_queued", table_name="messages", if_exists=True, **_CONC)
        op.create_index(
            "ix_messages_bulk_queued",
            "messages",
            ["batch_id", "published_at", "sid"],
            postgresql_where=sa.text(_BULK_QUEUED),
            sqlite_where=sa.text(_BULK_QUEUED),
            **_CONC,
        )
        op.drop_index(_SWEEPERS_NEXT, table_name="messages", if_exists=True, **_CONC)
        op.create_index(
            _SWEEPERS_NEXT,
            "messages",
            ["published_at"],
            postgresql_where=sa.text(_SINGLE_QUEUED),
            sqlite_where=sa.text(_SINGLE_QUEUED),
            **_CONC,
        )
        op.drop_index(_SWEEPERS, table_name="messages", if_exists=True, **_CONC)
        _rename_index(_SWEEPERS_NEXT, _SWEEPERS, ["published_at"], _SINGLE_QUEUED)


def downgrade() -> None:
    with _outside_transaction():
        op.drop_index("ix_messages_bulk_queued", table_name="messages", if_exists=True, **_CONC)
        op.drop_index(_SWEEPERS_NEXT, table_name="messages", if_exists=True, **_CONC)
        op.create_index(
            _SWEEPERS_NEXT,
            "messages",
            ["published_at"],
            postgresql_where=sa.text("status = 'queued'"),
            sqlite_where=sa.text("status = 'queued'"),
            **_CONC,
        )
        op.drop_index(_SWEEPERS, table_name="messages", if_exists=True, **_CONC)
        _rename_index(_SWEEPERS_NEXT, _SWEEPERS, ["published_at"], "status = 'queued'")
    with op.batch_alter_table("bulk_batches") as batch:
        batch.drop_column("finished_at")


def _rename_index(old: str, new: str, columns: list[str], where: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER INDEX {old} RENAME TO {new}")
        return
    # SQLite cannot rename an index: built again under its name (a small, embedded table).
    op.drop_index(old, table_name="messages")
    op.create_index(new, "messages", columns, sqlite_where=sa.text(where))


# Ignored by SQLite.
_CONC: dict[str, Any] = {"postgresql_concurrently": True}


def _outside_transaction() -> AbstractContextManager[object]:
    # CREATE INDEX CONCURRENTLY refuses to run inside a transaction block (SQLite, which
    # ignores the postgresql_ options, migrates in its transaction as before).
    if op.get_bind().dialect.name == "postgresql":
        return op.get_context().autocommit_block()
    return nullcontext()
