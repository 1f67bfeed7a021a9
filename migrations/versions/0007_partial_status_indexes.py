"""the sweeper's and the reconciler's indexes cover only the statuses they look for

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:00:00

Every status change of a message rewrites its row outside HOT (status and updated_at are
indexed), so each update writes an entry into every index of `messages`. Three of them served
only questions about one or two statuses (the sweeper: queued and unpublished, sending with an
expired lease; the reconciler: sent or in doubt and silent) while holding every message ever
sent. As partial indexes they hold only the messages in those statuses: a message's five
updates on its way to delivered write two index entries fewer each (PostgreSQL's CPU per
dispatched message fell by about a third; docs/performance.md, issue 13, fifth pass).

On PostgreSQL the indexes are built and dropped CONCURRENTLY, outside a transaction, so a
running service keeps writing while this migrates a large table; a run that failed half-way
can be run again.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PARTIAL = (
    ("ix_messages_queued_published_at", "published_at", "status = 'queued'"),
    ("ix_messages_sending_lease_expires_at", "lease_expires_at", "status = 'sending'"),
    ("ix_messages_silent_updated_at", "updated_at", "status IN ('sent', 'in_doubt')"),
)
_FULL = (
    ("ix_messages_status_published_at", "published_at"),
    ("ix_messages_status_lease_expires_at", "lease_expires_at"),
    ("ix_messages_status_updated_at", "updated_at"),
)


def upgrade() -> None:
    with _outside_transaction():
        for name, column, where in _PARTIAL:
            # A build that failed half-way (CONCURRENTLY commits as it goes) left an invalid
            # index of this name: dropped, so running the migration again finishes it.
            op.drop_index(name, table_name="messages", if_exists=True, **_CONCURRENTLY)
            op.create_index(
                name,
                "messages",
                [column],
                postgresql_where=sa.text(where),
                sqlite_where=sa.text(where),
                **_CONCURRENTLY,
            )
        for name, _ in _FULL:
            op.drop_index(name, table_name="messages", if_exists=True, **_CONCURRENTLY)


def downgrade() -> None:
    with _outside_transaction():
        for name, column in _FULL:
            op.drop_index(name, table_name="messages", if_exists=True, **_CONCURRENTLY)
            op.create_index(name, "messages", ["status", column], **_CONCURRENTLY)
        for name, _, _ in _PARTIAL:
            op.drop_index(name, table_name="messages", if_exists=True, **_CONCURRENTLY)


# Ignored by SQLite.
_CONCURRENTLY: dict[str, Any] = {"postgresql_concurrently": True}


def _outside_transaction() -> AbstractContextManager[object]:
    # CREATE INDEX CONCURRENTLY refuses to run inside a transaction block (the SQLite default,
    # which ignores the postgresql_ options, migrates in its transaction as before).
    if op.get_bind().dialect.name == "postgresql":
        return op.get_context().autocommit_block()
    return nullcontext()
