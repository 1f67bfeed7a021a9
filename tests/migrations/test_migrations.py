"""The schema comes from Alembic alone, so the migrations must build exactly what the models say,
and must go down and up again cleanly on the embedded SQLite backend too."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect

from shared.core.db import create_db_engine
from shared.core.models import Base
from shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL_TABLES = set(Base.metadata.tables)


def alembic_config() -> Config:
    return Config(str(ROOT / "alembic.ini"))


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def cli_migrate(database_url: str) -> None:
    """`sms-dispatch migrate` in its own process, against `database_url` only."""
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "migrate"],
        check=True,
        cwd=ROOT,
        env={**os.environ, "SMSD_DATABASE_URL": database_url},
        capture_output=True,
        timeout=120,
    )


def alembic_downgrade_base(engine: Engine) -> None:
    """`alembic downgrade base` in-process, on this engine's database and no other."""
    config = alembic_config()
    with engine.begin() as connection:
        # env.py uses a given connection instead of the settings' URL (the suite's PostgreSQL).
        config.attributes["connection"] = connection
        command.downgrade(config, "base")


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@pytest.fixture
def postgres(migrated: Settings) -> Iterator[Engine]:
    engine = create_db_engine(migrated)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/x.db"


@pytest.fixture
def sqlite(sqlite_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlite_url)
    yield engine
    engine.dispose()


def test_there_is_a_single_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def test_postgres_is_migrated_to_head(postgres: Engine) -> None:
    assert current_revision(postgres) == head_revision()


def test_postgres_schema_from_upgrade_head_matches_the_models(postgres: Engine) -> None:
    assert schema_diff(postgres) == []


def test_sqlite_migrate_creates_every_model_table(sqlite_url: str, sqlite: Engine) -> None:
    cli_migrate(sqlite_url)
    assert set(inspect(sqlite).get_table_names()) == MODEL_TABLES | {"alembic_version"}
    assert current_revision(sqlite) == head_revision()


def test_sqlite_schema_from_migrate_matches_the_models(sqlite_url: str, sqlite: Engine) -> None:
    cli_migrate(sqlite_url)
    assert schema_diff(sqlite) == []


def test_sqlite_downgrade_to_base_drops_every_model_table(sqlite_url: str, sqlite: Engine) -> None:
    cli_migrate(sqlite_url)
    alembic_downgrade_base(sqlite)
    assert set(inspect(sqlite).get_table_names()) == {"alembic_version"}
    assert current_revision(sqlite) is None


def test_sqlite_upgrade_after_downgrade_rebuilds_the_same_schema(
    sqlite_url: str, sqlite: Engine
) -> None:
    cli_migrate(sqlite_url)
    alembic_downgrade_base(sqlite)
    cli_migrate(sqlite_url)
    assert current_revision(sqlite) == head_revision()
    assert schema_diff(sqlite) == []


def test_migrate_is_idempotent(sqlite_url: str, sqlite: Engine) -> None:
    cli_migrate(sqlite_url)
    cli_migrate(sqlite_url)
    assert current_revision(sqlite) == head_revision()
