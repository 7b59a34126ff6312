"""Engine factory: URLs, SQLite connection setup, transactions, schema checks."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, LargeBinary, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from ..errors import InvalidArgument, NotFound, SchemaError, StoreBusy, StoreUnavailable
from ..locations import sqlite_file_url

BUSY_TIMEOUT_MS = 30_000


def resolve_url(url_or_path: str | os.PathLike[str]) -> str:
    """A bare path means SQLite; anything with ``://`` is an SQLAlchemy URL."""
    text = os.fspath(url_or_path)
    if not text.strip():
        raise InvalidArgument("the database location is empty: give a file path or a URL")
    if "://" in text:
        parse_url(text)  # refuse a malformed URL or an unknown scheme now, before anything is opened
        return text
    return sqlite_file_url(text)


def parse_url(url: str) -> URL:
    """``url`` parsed, with a dialect this installation can load; InvalidArgument otherwise."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise InvalidArgument(
            f"unknown database URL scheme {scheme!r}: use a file path, sqlite:///PATH or postgresql+psycopg://..."
        ) from None
    except (ArgumentError, ValueError) as e:
        raise InvalidArgument(f"{url!r} is not a database URL ({e})") from None
    return parsed


def shown_url(url: str) -> str:
    """``url`` for messages: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def sqlite_path(url: str) -> Path | None:
    """The file behind an SQLite URL, or None for other databases and ``:memory:``."""
    u = parse_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _prepare_sqlite_file(path: Path, create: bool) -> None:
    if path.is_dir():
        raise StoreUnavailable(f"cannot use {path} as a database: it is a directory", errno.EISDIR)
    if not path.parent.is_dir():
        raise NotFound(f"cannot open database {path}: directory {path.parent} does not exist")
    if not create and not path.exists():
        raise NotFound(f"no database at {path}: run 'iommupt-store init' to create it")
    # A new store is private to its user: create it 0600 before SQLite does (0644).
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreUnavailable(f"cannot create database {path}: {e.strerror}", e.errno or errno.EIO) from None


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
    if path is None and parse_url(url).get_backend_name() != "sqlite":
        try:
            # NullPool: a Store keeps its own connection (one per process); a pool would only let a
            # forked child pick up its parent's socket
            # synchronous_commit=off, like SQLite's WAL + synchronous=NORMAL: no fsync wait per commit; a
            # crash of the server may lose the last commits, never consistency (see README)
            # (unless the URL sets its own server options)
            options = {} if "options" in parse_url(url).query else {"options": "-c synchronous_commit=off"}
            server = create_engine(url, poolclass=NullPool, connect_args=options)
        except ImportError as e:  # a known dialect whose driver is not installed
            raise InvalidArgument(f"{shown_url(url)} needs a database driver that is not installed ({e})") from None
        if server.dialect.driver == "psycopg":
            event.listen(server, "before_cursor_execute", _blobs_in_binary)
        return server
    if path is not None:
        _prepare_sqlite_file(path, create)
    # NullPool: a Store keeps its own connection and reopens it after a fork. Any thread may use it,
    # one at a time (the Store hands it to one transaction at a time).
    engine = create_engine(
        url, poolclass=NullPool if path else None, connect_args={"check_same_thread": False} if path else {}
    )

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


def _blobs_in_binary(
    _conn: Connection, cursor: Any, _statement: str, _params: Any, context: Any, _executemany: bool
) -> None:
    """A statement whose rows hold bytes (page contents) gets them in psycopg's binary format: a 4 KiB
    frame arrives as its 4096 bytes instead of 8 KiB of hex text to decode. Only there: every other
    result keeps the text format SQLAlchemy is used to."""
    compiled = getattr(context, "compiled", None)
    # the columns SQLAlchemy expects in the rows (a SELECT's, or RETURNING's); none for text() and driver SQL
    entries = getattr(compiled, "_result_columns", None) or ()
    if any(isinstance(getattr(e.type, "impl_instance", e.type), LargeBinary) for e in entries):
        from psycopg.pq import Format  # loaded already (the engine's driver); not at all for SQLite

        cursor.format = Format.BINARY


def writer(engine: Engine) -> Engine:
    """The same engine, but transactions take the write lock up front.

    A deferred SQLite writer that read first fails at once with "database is
    locked" when another writer committed meanwhile; an immediate one waits.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


#: driver messages (SQLite, PostgreSQL) that say the database cannot be reached or opened, and the errno
_UNAVAILABLE = (
    ("unable to open database file", errno.EACCES, "cannot open it (is the file readable and its directory writable?)"),
    ("attempt to write a readonly database", errno.EROFS, "it is read-only"),
    ("readonly database", errno.EROFS, "it is read-only"),
    ("disk i/o error", errno.EIO, "disk I/O error"),
    ("database or disk is full", errno.ENOSPC, "the disk is full"),
    ("connection refused", errno.ECONNREFUSED, "connection refused (is the server running?)"),
    ("could not translate host name", errno.EHOSTUNREACH, "unknown host"),
    ("timeout expired", errno.ETIMEDOUT, "the server did not answer"),
    ("authentication failed", errno.EACCES, "authentication failed"),
    ("does not exist", errno.ENOENT, "the database does not exist"),
    ("connection failed", errno.ECONNREFUSED, "cannot connect"),
    ("could not connect", errno.ECONNREFUSED, "cannot connect"),
)
_DAMAGED = ("database disk image is malformed", "file is not a database", "file is encrypted", "malformed database")


@contextlib.contextmanager
def translate_db_errors(url: str) -> Iterator[None]:
    """Turn driver errors that have a clear meaning into our errors (with the exit codes they document)."""
    try:
        yield
    except DBAPIError as e:
        text = str(e.orig) if e.orig is not None else str(e)
        low = text.lower()
        where = shown_url(url)
        if "database is locked" in low or "database is busy" in low or "database table is locked" in low:
            raise StoreBusy(f"database {where} is locked by another process (waited {BUSY_TIMEOUT_MS} ms)") from e
        if any(d in low for d in _DAMAGED):
            first = text.strip().splitlines()[0] if text.strip() else "damaged"
            raise SchemaError(f"{where} is not an SQLite database, or a damaged one ({first})") from e
        if isinstance(e.orig, sqlite3.OperationalError) or e.connection_invalidated or _connecting(e):
            for needle, code, meaning in _UNAVAILABLE:
                if needle in low:
                    raise StoreUnavailable(f"database {where}: {meaning}", code) from e
        raise


def _connecting(e: DBAPIError) -> bool:
    """Whether the driver failed while opening the connection (no statement was sent)."""
    return e.statement is None


def table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())
