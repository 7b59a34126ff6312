"""Alembic history: pytest-alembic's built-in checks, plus our own revision handling.

The built-in tests (single head, upgrade base -> head, models match the DDL,
every downgrade runs) are imported here so they run without ``--test-alembic``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.config import Config
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine, inspect

from iommupt_store.db import migrate
from iommupt_store.db.engine import make_engine
from iommupt_store.db.models import Base
from iommupt_store.errors import SchemaError
from iommupt_store.store import Store

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]


@pytest.fixture
def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.migrations_dir()))
    return cfg


@pytest.fixture
def alembic_engine(tmp_path: Path) -> Iterator[Engine]:
    # the store's own SQLite setup (WAL, explicit BEGIN), foreign keys off as for real migrations
    engine = make_engine(f"sqlite:///{tmp_path / 'alembic.db'}", foreign_keys=False)
    yield engine
    engine.dispose()


def test_migrations_dir_holds_env_and_versions() -> None:
    d = migrate.migrations_dir()
    assert (d / "env.py").is_file()
    assert list((d / "versions").glob("*.py"))


def test_history_is_linear_from_base_to_head() -> None:
    revs = migrate.history()
    assert revs[0]["down_revision"] is None
    for older, newer in itertools.pairwise(revs):
        assert newer["down_revision"] == older["revision"]
    assert revs[-1]["revision"] == migrate.head_revision()
    assert migrate.known_revisions() == {r["revision"] for r in revs}


def test_upgrade_creates_every_model_table(db_url: str, db_path: Path) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url, create=False)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= set(Base.metadata.tables)
            assert migrate.current_revision(conn) == migrate.head_revision()
    finally:
        engine.dispose()


def test_downgrade_to_base_then_upgrade_again(db_url: str, db_path: Path) -> None:
    Store.init(db_url).close()
    migrate.downgrade(db_url, "base")
    conn = sqlite3.connect(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables <= {"alembic_version"}
    # the store refuses it, pointing at init
    with pytest.raises(SchemaError, match="iommupt-store init"):
        Store(db_url)
    Store.init(db_url).close()
    Store(db_url).close()


def test_migration_rolls_back_when_it_breaks_foreign_keys(db_url: str, db_path: Path) -> None:
    """Migrations run with foreign keys off and are checked before commit."""
    store = Store.init(db_url)
    store.create_machine("m", 4 << 20)
    store.machine("m")
    store.close()
    # plant a dangling reference while foreign keys are off
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE boot SET machine_id = 999")
    conn.commit()
    conn.close()
    before = Path(db_path).read_bytes()
    with pytest.raises(SchemaError, match="foreign key"):
        migrate.upgrade(db_url, "head")  # a no-op upgrade still runs the check
    assert Path(db_path).read_bytes() == before
