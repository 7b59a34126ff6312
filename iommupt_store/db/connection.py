"""One database connection per process, reused by every transaction of a Store.

Opening a connection per transaction costs twice: the first read of a fresh
connection starts with an empty page cache, and SQLite checkpoints the WAL
(and fsyncs) whenever its last connection closes. So a Store keeps one
connection and hands it to one transaction at a time:

- writers take the write lock up front (``BEGIN IMMEDIATE`` on SQLite);
- readers are read-only at the database level when asked (``PRAGMA
  query_only`` on SQLite, ``BEGIN READ ONLY`` on PostgreSQL), switched per
  transaction since the connection outlives it;
- a connection is never used across a fork: a child process (pid changed)
  opens its own and leaves its parent's alone, neither using nor closing it;
- a connection an error invalidated, or left in a transaction, is dropped and
  the next transaction opens a new one;
- a transaction opened while the shared connection is busy (a nested one, or
  another thread's) gets a connection of its own for its duration, as before.

SQLite then checkpoints when its own ``wal_autocheckpoint`` policy says (every
1000 WAL pages), and once more when the Store is closed or the process exits.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

from sqlalchemy import Connection, Engine

#: connections inherited from a parent process: kept referenced so that this process never closes
#: them (closing would end the parent's PostgreSQL session, or touch its SQLite locks)
_INHERITED: list[Connection] = []


class SharedConnection:
    """The one connection of a Store in this process (opened on first use)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self._pid = 0
        self._query_only = False
        self._busy = threading.Lock()
        self._finalizer: weakref.finalize[[Connection, int], SharedConnection] | None = None

    def _current(self) -> Connection:
        conn = self._conn
        if conn is not None and self._pid != os.getpid():
            _INHERITED.append(conn)
            if self._finalizer is not None:
                self._finalizer.detach()
            conn = self._conn = None
        if conn is not None and (conn.closed or conn.invalidated or conn.in_transaction()):
            self.close()
            conn = None
        if conn is None:
            conn = self.engine.connect()
            self._conn, self._pid, self._query_only = conn, os.getpid(), False
            # a clean exit closes it (SQLite checkpoints then), but only in the process that opened it
            self._finalizer = weakref.finalize(self, _close_if_owner, conn, self._pid)
        return conn

    @contextlib.contextmanager
    def begin(self, *, write: bool, read_only: bool = False) -> Iterator[Connection]:
        """A database transaction on the shared connection: committed when the block exits normally
        if ``write``, else rolled back. ``read_only`` makes the database refuse writes."""
        if not self._busy.acquire(blocking=False):
            with self.engine.connect() as own, _transaction(own, write, read_only, None):
                yield own
            return
        try:
            conn = self._current()
            try:
                with _transaction(conn, write, read_only, self._query_only):
                    self._query_only = read_only
                    yield conn
            except BaseException:
                if conn.invalidated or conn.in_transaction():
                    self.close()
                raise
        finally:
            self._busy.release()

    def close(self) -> None:
        """Close the connection (SQLite may checkpoint now); the next transaction opens a new one."""
        conn, self._conn = self._conn, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if conn is not None:
            _close_if_owner(conn, self._pid)


@contextlib.contextmanager
def _transaction(conn: Connection, write: bool, read_only: bool, query_only: bool | None) -> Iterator[None]:
    """``query_only``: the connection's SQLite ``query_only`` flag as it stands (None: a connection of
    its own, whose flag is switched off again at the end)."""
    sqlite = conn.dialect.name == "sqlite"
    if sqlite and read_only != bool(query_only):
        # before BEGIN: a query-only connection refuses BEGIN IMMEDIATE
        conn.execution_options(sqlite_begin="DEFERRED")
        conn.exec_driver_sql(f"PRAGMA query_only = {'ON' if read_only else 'OFF'}")
        conn.rollback()  # ends the transaction the statement began
    conn.execution_options(sqlite_begin="IMMEDIATE" if write else "DEFERRED")
    # psycopg opens the transaction with the first statement: as BEGIN READ ONLY when asked, no extra round trip
    driver = conn.connection.dbapi_connection if conn.dialect.driver == "psycopg" else None
    if driver is not None:
        driver.read_only = read_only
    with conn.begin() as dbtx:
        if read_only and driver is None and conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        try:
            yield
        finally:
            if sqlite and read_only and query_only is None and not conn.invalidated:
                conn.exec_driver_sql("PRAGMA query_only = OFF")  # a pooled (in-memory) connection lives on
        if not write:
            dbtx.rollback()


def _close_if_owner(conn: Connection, pid: int) -> None:
    if os.getpid() == pid:
        with contextlib.suppress(Exception):  # closing is best effort: the data is committed already
            conn.close()
    else:
        _INHERITED.append(conn)
