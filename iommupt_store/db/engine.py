"""Engine factory: URLs, SQLite connection setup, transactions, schema checks."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from ..errors import NotFound, SchemaError, StoreBusy

DEFAULT_DB = "iommupt.db"
BUSY_TIMEOUT_MS = 30_000


def resolve_url(url_or_path: str | os.PathLike[str]) -> str:
    """A bare path means SQLite; anything with ``://`` is an SQLAlchemy URL."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().absolute()}"


def sqlite_path(url: str) -> Path | None:
    """The file behind an SQLite URL, or None for other databases and ``:memory:``."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _prepare_sqlite_file(path: Path, create: bool) -> None:
    if not path.parent.is_dir():
        raise NotFound(f"cannot open database {path}: directory {path.parent} does not exist")
    if not create and not path.exists():
        raise NotFound(f"no database at {path}: run 'iommupt-store init' to create it")
    # A new store is private to its user: create it 0600 before SQLite does (0644).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _is_new_or_ours(cur: sqlite3.Cursor) -> bool:
    """An empty database (being created) or one that carries an Alembic version table."""
    if cur.execute("PRAGMA page_count").fetchone()[0] == 0:
        return True
    return cur.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone() is not None


def make_engine(url: str, *, foreign_keys: bool = True, create: bool = True) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys, a busy timeout and
    explicit BEGINs: ``BEGIN IMMEDIATE`` for writers (see ``writer``).

    ``create=False`` refuses an SQLite file that does not exist yet (NotFound)
    instead of creating an empty one.
    """
    path = sqlite_path(url)
    if path is None and make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if path is not None:
        _prepare_sqlite_file(path, create)
    # NullPool: each process opens its own connection; nothing survives a fork.
    engine = create_engine(url, poolclass=NullPool if path else None)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        if path is not None and _is_new_or_ours(cur):
            # journal_mode=WAL rewrites the file header: never do it to someone else's database
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives any process crash; only power loss may drop the last commits.
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, but transactions take the write lock up front.

    A deferred SQLite writer that read first fails at once with "database is
    locked" when another writer committed meanwhile; an immediate one waits.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


@contextlib.contextmanager
def translate_db_errors(url: str) -> Iterator[None]:
    """Turn driver errors that have a clear meaning into our errors."""
    try:
        yield
    except (OperationalError, DBAPIError) as e:
        text = str(e.orig) if e.orig is not None else str(e)
        if "database is locked" in text or "database is busy" in text:
            raise StoreBusy(f"database {url} is locked by another process (waited {BUSY_TIMEOUT_MS} ms)") from e
        if "file is not a database" in text or "file is encrypted" in text:
            raise SchemaError(f"{url} is not an SQLite database") from e
        raise


def table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())
