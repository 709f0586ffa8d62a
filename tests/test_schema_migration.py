"""`cad-node db upgrade`: the Alembic history gives exactly the schema of the SQLAlchemy models, on SQLite
and on the real PostgreSQL at 127.0.0.1:5432 (skipped when unreachable, failing when CI is set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from cad_node.job_database import Base, JobDatabase, Study, make_engine
from cad_node.schema_migration import alembic_config, current_revision, head_revision, upgrade

TABLES = {"studies", "instances", "jobs", "steps", "findings", "results", "deliveries"}


def differences(url: str) -> list[Any]:
    """What autogenerate would write into a new migration: the models against the migrated database."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def add_study(url: str, study_uid: str) -> None:
    database = JobDatabase(url)
    with database.session() as session:
        session.add(Study(study_uid=study_uid, calling_ae="PACS", calling_host="10.0.0.5", note=""))
    database.close()


def study_uids(url: str) -> list[str]:
    database = JobDatabase(url)
    with database.session() as session:
        uids = list(session.scalars(select(Study.study_uid)))
    database.close()
    return uids


def check_migrations(url: str) -> None:
    assert current_revision(url) is None
    assert upgrade(url) == head_revision()
    assert tables(url) >= TABLES
    assert differences(url) == []
    add_study(url, "1.2.3")
    assert upgrade(url) == head_revision()  # again: nothing to do, nothing lost
    assert study_uids(url) == ["1.2.3"]
    assert differences(url) == []


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.sqlite'}"


def test_sqlite_upgrade_gives_the_models_schema_and_is_idempotent(sqlite_url: str) -> None:
    check_migrations(sqlite_url)


def test_sqlite_downgrade_to_base_and_upgrade_again(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    assert current_revision(sqlite_url) is None
    assert not TABLES & tables(sqlite_url)
    assert upgrade(sqlite_url) == head_revision()
    assert differences(sqlite_url) == []


def test_comparison_sees_a_difference(sqlite_url: str) -> None:
    """The comparison above can fail: a column the models have and the database lacks is reported."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE jobs DROP COLUMN heartbeat_at"))
    engine.dispose()
    assert [d[0] for d in differences(sqlite_url)] == ["add_column"]


def test_postgresql_upgrade_gives_the_models_schema_and_is_idempotent(postgres_url: str) -> None:
    check_migrations(postgres_url)
