"""Alembic environment: the service's own settings and models, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from shared.core.db import create_db_engine
from shared.core.models import Base, UTCDateTime
from shared.core.settings import get_settings

config = context.config


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Migrations must not import application code, so our column type is written out plainly.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables there and is a no-op elsewhere.
        render_as_batch=True,
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


connection: Connection | None = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_db_engine(get_settings())
    with engine.connect() as own_connection:
        run(own_connection)
    engine.dispose()
