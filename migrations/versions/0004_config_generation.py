"""config generation: what lets the API cache account, key, campaign and provider lookups

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tables whose rows the API caches between requests (shared/core/config_cache.py).
CACHED_TABLES = ("accounts", "application_keys", "environments", "campaigns", "provider_accounts")


def upgrade() -> None:
    op.create_table(
        "config_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_generation")),
    )
    if op.get_bind().dialect.name != "postgresql":
        return  # the embedded SQLite default does not cache, so it needs no triggers
    # A fresh random value (never a counter: a TRUNCATE of this table too must not bring back
    # a value some process still holds), written in the changing transaction, so it becomes
    # visible exactly when the change does. An upsert, so a truncated row comes back.
    op.execute(
        """
        CREATE FUNCTION bump_config_generation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO config_generation (id, generation) VALUES (1, gen_random_uuid()::text)
            ON CONFLICT (id) DO UPDATE SET generation = EXCLUDED.generation;
            RETURN NULL;
        END $$
        """
    )
    for table in CACHED_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_config_changed "
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION bump_config_generation()"
        )
    op.execute("INSERT INTO config_generation (id, generation) VALUES (1, gen_random_uuid()::text)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in CACHED_TABLES:
            op.execute(f"DROP TRIGGER {table}_config_changed ON {table}")
        op.execute("DROP FUNCTION bump_config_generation()")
    op.drop_table("config_generation")
